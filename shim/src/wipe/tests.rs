//! Wipe tests on real temp trees. The mount tests need root (CI runs as
//! root) and leave nothing mounted even when they fail.

use super::*;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{mkdirat, Mode};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Unmounts (lazily) on drop whatever is still mounted at `0`.
struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        for _ in 0..4 {
            let _ = umount2(&self.0, MntFlags::MNT_DETACH);
        }
    }
}

fn bind(src: &Path, dst: &Path) -> Mounted {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>).expect("bind mount (needs root)");
    Mounted(dst.to_path_buf())
}

fn mounted_at_or_below(p: &Path) -> Vec<String> {
    let p = p.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&p))
        .collect()
}

fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn removes_nested_tree_with_odd_names_and_closed_modes() {
    for openat2 in [true, false] {
        let t = tmp();
        let top = t.path().join("inst");
        fs::create_dir_all(top.join("a/b/c")).unwrap();
        fs::write(top.join("a/b/c/f"), b"x").unwrap();
        for odd in [&b"-rf"[..], b"new\nline", b" sp ace ", b"\xff\xfe not utf8", b"..."] {
            fs::write(top.join("a").join(OsStr::from_bytes(odd)), b"y").unwrap();
        }
        fs::create_dir(top.join("closed")).unwrap();
        fs::write(top.join("closed/inside"), b"z").unwrap();
        fs::create_dir(top.join("closed/sub")).unwrap();
        fs::set_permissions(top.join("closed/sub"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(top.join("closed"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::write(top.join("a/nomode"), b"").unwrap();
        fs::set_permissions(top.join("a/nomode"), fs::Permissions::from_mode(0o000)).unwrap();
        nix::unistd::mkfifo(&top.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        remove_tree_with(&top, openat2).unwrap();
        assert!(!top.exists(), "openat2={openat2}");
        assert!(t.path().exists());
    }
}

#[test]
fn missing_dir_is_success() {
    let t = tmp();
    remove_tree(&t.path().join("never")).unwrap();
    remove_tree(&t.path().join("no/parent/either")).unwrap();
}

#[test]
fn refuses_root_and_dot_paths() {
    assert!(matches!(remove_tree(Path::new("/")), Err(WipeError::BadPath { .. })));
    assert!(matches!(remove_tree(Path::new("/tmp/..")), Err(WipeError::BadPath { .. })));
}

#[test]
fn symlinks_to_outside_file_and_dir_are_unlinked_not_followed() {
    let t = tmp();
    let outside = t.path().join("outside");
    fs::create_dir_all(outside.join("dir")).unwrap();
    fs::write(outside.join("dir/keep"), b"keep").unwrap();
    fs::write(outside.join("file"), b"keep").unwrap();
    let top = t.path().join("inst");
    fs::create_dir_all(top.join("x")).unwrap();
    symlink(outside.join("dir"), top.join("x/to-dir")).unwrap();
    symlink(outside.join("file"), top.join("x/to-file")).unwrap();
    symlink("../../outside", top.join("x/relative")).unwrap();
    symlink("/", top.join("root")).unwrap();
    remove_tree(&top).unwrap();
    assert!(!top.exists());
    assert_eq!(fs::read(outside.join("dir/keep")).unwrap(), b"keep");
    assert_eq!(fs::read(outside.join("file")).unwrap(), b"keep");
}

#[test]
fn top_that_is_a_symlink_is_unlinked_and_target_kept() {
    let t = tmp();
    let target = t.path().join("target");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("keep"), b"k").unwrap();
    let top = t.path().join("inst");
    symlink(&target, &top).unwrap();
    remove_tree(&top).unwrap();
    assert!(fs::symlink_metadata(&top).is_err());
    assert_eq!(fs::read(target.join("keep")).unwrap(), b"k");
}

#[test]
fn deep_tree_beyond_path_max_and_fd_window() {
    let t = tmp();
    let top = t.path().join("inst");
    fs::create_dir(&top).unwrap();
    // 1500 levels of "dd/" is 4500 bytes of path, past PATH_MAX (4096).
    let levels = 1500;
    let mut fd = nix::fcntl::open(&top, nix::fcntl::OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    for i in 0..levels {
        mkdirat(&fd, "dd", Mode::from_bits_truncate(0o755)).unwrap();
        if i % 500 == 0 {
            let f = nix::fcntl::openat(
                &fd,
                "f",
                nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY,
                Mode::from_bits_truncate(0o644),
            )
            .unwrap();
            drop(f);
        }
        fd = nix::fcntl::openat(&fd, "dd", nix::fcntl::OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    }
    drop(fd);
    let before = open_fds();
    remove_tree(&top).unwrap();
    assert!(!top.exists());
    // Other tests run in parallel threads and open fds too: allow slack,
    // but one fd per level (1500) would show.
    assert!(open_fds() < before + 50);
}

#[test]
fn bind_mount_inside_is_not_crossed_and_is_detached() {
    for openat2 in [true, false] {
        let t = tmp();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("deep")).unwrap();
        fs::write(src.join("deep/precious"), b"p").unwrap();
        let top = t.path().join("inst");
        fs::create_dir_all(top.join("a/mnt")).unwrap();
        fs::create_dir_all(top.join("b/stacked")).unwrap();
        fs::write(top.join("a/file-mnt"), b"").unwrap();
        fs::write(t.path().join("src-file"), b"f").unwrap();
        // Same filesystem as the tree: st_dev alone would not see these.
        let _m1 = bind(&src, &top.join("a/mnt"));
        let _m2 = bind(&src, &top.join("b/stacked"));
        let _m3 = bind(&src, &top.join("b/stacked"));
        let _m4 = bind(&t.path().join("src-file"), &top.join("a/file-mnt"));
        assert_eq!(mounted_at_or_below(&top).len(), 4);
        remove_tree_with(&top, openat2).unwrap();
        assert!(!top.exists(), "openat2={openat2}");
        assert_eq!(fs::read(src.join("deep/precious")).unwrap(), b"p");
        assert_eq!(fs::read(t.path().join("src-file")).unwrap(), b"f");
        assert!(mounted_at_or_below(&top).is_empty());
    }
}

#[test]
fn errors_name_their_paths() {
    let e = WipeError::Incomplete {
        path: "/x".into(),
        errors: vec![
            WipeError::OtherMount { path: "/x/m".into(), tries: 8 },
            WipeError::Sys { path: "/x/f".into(), op: "unlink", errno: nix::errno::Errno::EPERM },
        ],
    };
    let lines = e.lines();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("/x/m: ") && lines[1].starts_with("/x/f: unlink: EPERM"), "{lines:?}");
}
