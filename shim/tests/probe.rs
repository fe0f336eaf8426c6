//! `berth-shim probe-userns`, run for real (root): user namespaces, a fresh
//! /proc, and overlayfs mounted from inside the user namespace.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::process::Command;

fn probe(args: &[&std::path::Path]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth-shim")).arg("probe-userns").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn userns_probe_passes_here() {
    let (ok, err) = probe(&[]);
    assert!(ok, "{err}");
}

#[test]
fn overlay_probe_passes_on_a_plain_fs_and_fails_on_overlayfs() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("ovl");
    let (ok, err) = probe(&[&dir]);
    assert!(ok, "overlayfs in a user namespace on the temp fs: {err}");
    assert!(!dir.exists(), "the probe cleans up");
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
    let (ok, err) = probe(&[&m.join("probe")]);
    umount2(&m, MntFlags::MNT_DETACH).unwrap();
    assert!(!ok);
    assert!(err.contains("overlayfs"), "{err}");
}
