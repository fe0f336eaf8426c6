//! `check`'s disk item: can this node give each build a filesystem of its
//! own as its hard disk limit? Tried for real when the host is the real one:
//! a small image is made, bound and mounted in the state dir exactly as
//! spawn does it, overlayfs is mounted on it from inside a user namespace
//! (`berth-shim probe-userns`), and all of it is removed again.
#![forbid(unsafe_code)]

use super::{fail, ok, warn, Item};
use crate::config::quantity::format_bytes;
use berth_shim::disk::{self, DiskSpec};
use std::path::Path;
use std::process::Command;

const N: &str = "disk limit";
const FIX: &str = "give the agent loop devices (a privileged container with the host's /dev, or `modprobe loop`) \
                   and install e2fsprogs (mkfs.ext4); or run with --build-disk 0 (no disk limit, not recommended)";

pub fn check(state: &Path, build_disk: u64, real: bool, shim: Option<&Path>) -> Item {
    if build_disk == 0 {
        return warn(
            N,
            "--build-disk 0: builds have no disk limit and one build can fill the state dir",
            "set --build-disk (for example 20Gi)",
        );
    }
    if let Err(e) = disk::mechanism() {
        return fail(N, format!("--build-disk {}: {e}", format_bytes(build_disk)), FIX);
    }
    if !real {
        return ok(N, "mkfs.ext4 and /dev/loop-control found (mount probe skipped: --proc-root is not /proc)");
    }
    match probe(state, shim) {
        Ok(()) => ok(
            N,
            format!(
                "each build gets a sparse ext4 image of {} on a loop device, and overlayfs mounts on it in a user namespace",
                format_bytes(build_disk)
            ),
        ),
        Err(e) => fail(N, e, FIX),
    }
}

fn probe(state: &Path, shim: Option<&Path>) -> Result<(), String> {
    let shim = crate::run::find_shim(shim).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(state).map_err(|e| format!("{}: {e}", state.display()))?;
    let dir = state.join(format!(".berth-check-disk-{}", std::process::id()));
    let mount = dir.join("root");
    std::fs::create_dir_all(&mount).map_err(|e| format!("{}: {e}", mount.display()))?;
    let spec = DiskSpec::new(&dir, mount.clone(), disk::MIN_SIZE);
    let res = disk::acquire(&spec, berth_shim::probe::PROBE_HOST_ID, &state.join(disk::template::DIR))
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let o = Command::new(&shim)
                .arg("probe-userns")
                .arg(mount.join("probe"))
                .output()
                .map_err(|e| format!("{}: {e}", shim.display()))?;
            match o.status.success() {
                true => Ok(()),
                false => {
                    Err(format!("overlayfs on the build filesystem: {}", String::from_utf8_lossy(&o.stderr).trim()))
                }
            }
        });
    let mut left = berth_shim::teardown::mounts::unmount_below(Path::new("/proc"), &dir);
    if let Err(e) = berth_shim::wipe::remove_tree(&dir) {
        left.extend(e.lines());
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    left.extend(disk::settle(&format!("{name}/{}", disk::IMAGE_FILE)));
    match (res, left.is_empty()) {
        (Err(e), _) => Err(e),
        (Ok(()), true) => Ok(()),
        (Ok(()), false) => Err(format!("the probe left: {}", left.join("; "))),
    }
}
