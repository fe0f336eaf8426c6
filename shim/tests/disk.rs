//! The instance disk for real (needs root and loop devices, as CI has): a
//! 64 MiB image mounted where the daemon's root goes is a hard limit, costs
//! the node only what is written, carries overlayfs made inside a user
//! namespace (as buildkit's snapshotter does), and the teardown leaves no
//! mount, loop device or image.

use berth_shim::disk::{self, DiskSpec};
use berth_shim::teardown::mounts;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

const SHIM: &str = env!("CARGO_BIN_EXE_berth-shim");
/// The probe's mapped root (see berth_shim::probe::PROBE_MAP).
const PROBE_ID: u32 = 2147483648;

#[test]
fn image_is_a_hard_limit_carries_userns_overlay_and_leaves_nothing() {
    if let Err(e) = disk::mechanism() {
        panic!("this test needs loop devices and mkfs.ext4 (CI installs them): {e}");
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join(format!("i{:x}", std::process::id()));
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).unwrap();
    let root = dir.join("root");
    fs::create_dir(&root).unwrap();
    let spec = DiskSpec::new(&dir, root.clone(), 64 << 20);
    disk::acquire(&spec, PROBE_ID, &tmp.path().join("templates")).expect("acquire");
    let cleanup = scopeguard(&dir);

    let meta = fs::metadata(&root).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (PROBE_ID, PROBE_ID, 0o700));
    assert_eq!(mounts::below(Path::new("/proc"), &root).unwrap().len(), 1, "one mount on the root dir");
    assert!(!root.join("lost+found").exists());
    let fresh = disk::usage(&root).expect("usage of the mounted image");
    assert!(!fresh.full() && fresh.size <= 64 << 20, "{fresh:?}");

    // 200 MiB into a 64 MiB limit: ENOSPC, and the node pays at most the limit.
    let mut f = fs::File::create(root.join("big")).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        match f.write_all(&chunk).and_then(|_| f.sync_data()) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(written <= 200 << 20, "wrote 200 MiB into a 64 MiB disk");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(f);
    let full = disk::usage(&root).unwrap();
    assert!(full.full(), "{full:?}");
    let on_node = fs::metadata(&spec.image).unwrap().blocks() * 512;
    assert!(on_node <= (64 << 20) + (1 << 20), "the image holds {on_node} bytes on the node");
    fs::remove_file(root.join("big")).unwrap();

    // overlayfs made inside a user namespace on top of this filesystem.
    let probe = Command::new(SHIM).arg("probe-userns").arg(root.join("probe")).output().unwrap();
    assert!(probe.status.success(), "probe-userns on the image: {}", String::from_utf8_lossy(&probe.stderr));

    drop(cleanup);
    assert!(mounts::below(Path::new("/proc"), &dir).unwrap().is_empty());
    assert!(!spec.image.exists());
    assert_eq!(disk::bound_loops(Path::new("/sys"), &disk::image_needle(&spec)), vec![]);
}

/// Tears the instance down as the shim does: unmount, remove, let the loop
/// device go.
struct Guard(std::path::PathBuf);
fn scopeguard(dir: &Path) -> Guard {
    Guard(dir.to_path_buf())
}
impl Drop for Guard {
    fn drop(&mut self) {
        let left = mounts::unmount_below(Path::new("/proc"), &self.0);
        assert!(left.is_empty(), "{left:?}");
        let name = self.0.file_name().unwrap().to_string_lossy().into_owned();
        let _ = berth_shim::wipe::remove_tree(&self.0);
        let left = disk::settle(&format!("{name}/{}", disk::IMAGE_FILE));
        assert!(left.is_empty(), "{left:?}");
    }
}

#[test]
fn a_failed_acquire_leaves_no_image() {
    let tmp = tempfile::tempdir().unwrap();
    // The mount point does not exist: mkfs and the loop device succeed,
    // the mount fails, and the image and device go again.
    let spec = DiskSpec::new(tmp.path(), tmp.path().join("missing"), 32 << 20);
    let err = disk::acquire(&spec, 1 << 20, &tmp.path().join("templates")).unwrap_err();
    assert_eq!(err.metric_label(), "mount", "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(!spec.image.exists());
    let left = disk::settle(&disk::image_needle(&spec));
    assert!(left.is_empty(), "{left:?}");
}
