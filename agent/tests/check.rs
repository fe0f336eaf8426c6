//! `berth-agent check` on the real host (root): a fit node passes, and a
//! state dir on overlayfs (as in a container's own root fs) is refused with
//! the fix, while overlayfs-in-userns is reported as unavailable there.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::Path;
use std::process::Command;

fn check(state: &Path) -> (i32, String) {
    let shim = Path::new(env!("CARGO_BIN_EXE_berth-agent")).with_file_name("berth-shim");
    let out = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
        .args(["check", "--daemon", "/bin/true", "--state-dir"])
        .arg(state)
        .arg("--shim")
        .arg(&shim)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn state_dir_on_overlayfs_fails_with_the_fix() {
    let t = tempfile::tempdir().unwrap();
    let (code, out) = check(&t.path().join("state"));
    let line = |name: &str| {
        out.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{name} missing:\n{out}")).to_string()
    };
    assert!(line("user namespaces").starts_with("ok"), "{out}");
    assert!(line("overlayfs").starts_with("ok"), "{out}");
    assert!(line("state dir").starts_with("ok"), "{out}");
    // /bin/true is no buildkitd: runc is not required, so only real misses fail.
    assert_eq!(code, 0, "{out}");

    for d in ["l", "u", "w", "m"] {
        std::fs::create_dir(t.path().join(d)).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        t.path().join("l").display(),
        t.path().join("u").display(),
        t.path().join("w").display()
    );
    let m = t.path().join("m");
    mount(Some("overlay"), &m, Some("overlay"), MsFlags::empty(), Some(opts.as_str())).unwrap();
    let (code, out) = check(&m.join("state"));
    umount2(&m, MntFlags::MNT_DETACH).unwrap();
    assert_eq!(code, 1, "{out}");
    let state = out.lines().find(|l| l.contains("state dir")).unwrap();
    assert!(state.starts_with("FAIL") && state.contains("overlayfs"), "{out}");
    assert!(out.contains("not on overlayfs"), "the fix is printed:\n{out}");
    let ovl = out.lines().find(|l| l.contains("overlayfs ")).unwrap();
    assert!(ovl.starts_with("warn"), "{out}");
}
