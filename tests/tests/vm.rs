//! The cgroup v2 lane, as part of the suite: `tests/vm/run.sh` boots a
//! Debian VM with cgroup v2 only (image built by debootstrap from the
//! machine's own apt mirror, cached under /var/cache/berth-vm) and runs the
//! suites listed in `tests/vm/suites` there, against the binaries this run
//! built; it fails if any of them fails or anything leaked in the VM.
//!
//! Needs root, qemu-system-x86_64 and debootstrap (`.ci/run` installs them).
//! Without them, or with `BERTH_VM_LANE=skip`, it says SKIPPED and why.

use std::path::Path;
use std::process::Command;

fn have(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).chain(["/usr/sbin".into(), "/sbin".into()]).any(|d| d.join(tool).is_file())
    })
}

#[test]
fn cgroup_v2_lane() {
    if std::env::var_os("BERTH_IN_VM").is_some() {
        eprintln!("SKIPPED: cgroup v2 lane: already inside the lane's VM");
        return;
    }
    if std::env::var("BERTH_VM_LANE").as_deref() == Ok("skip") {
        eprintln!("SKIPPED: cgroup v2 lane: BERTH_VM_LANE=skip; run it by hand with tests/vm/run.sh");
        return;
    }
    let missing: Vec<&str> =
        ["qemu-system-x86_64", "debootstrap", "mkfs.ext4"].into_iter().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIPPED: cgroup v2 lane: {missing:?} not installed (apt-get install qemu-system-x86 debootstrap e2fsprogs; .ci/run does)"
        );
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: cgroup v2 lane: needs root (debootstrap, the VM's 9p shares)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/run.sh");
    let st = Command::new("bash").arg(&script).status().expect("bash");
    assert!(st.success(), "the cgroup v2 lane failed ({st}): its output is above; rerun it with {}", script.display());
}
