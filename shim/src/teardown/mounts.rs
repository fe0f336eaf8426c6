//! Mounts at or below an instance dir, from `<proc>/self/mountinfo`.
//!
//! The daemon's own mounts live in its private mount namespace and vanish
//! with it; what this finds are mounts made in the host namespace (by an
//! operator, a CSI call or a bug) that would pin the dir. They are detached
//! deepest first, so a parent is never detached from under a child that is
//! still named in the table.

use crate::mountinfo;
use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Mount points at or below `dir`, deepest first (stacked mounts appear
/// once per mount, so each gets its own umount).
pub fn below(proc_root: &Path, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> =
        mountinfo::read(proc_root)?.into_iter().map(|m| m.mount_point).filter(|m| m.starts_with(dir)).collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    Ok(found)
}

/// Lazily unmounts everything at or below `dir`; returns one line per
/// failure, naming the mount point.
pub fn unmount_below(proc_root: &Path, dir: &Path) -> Vec<String> {
    // mountinfo names resolved paths: match against the resolved dir. Only
    // the parent is resolved: were the dir itself a symlink, following it
    // would unmount whatever it points to.
    let dir = match (dir.parent().map(fs::canonicalize), dir.file_name()) {
        (Some(Ok(parent)), Some(name)) => parent.join(name),
        _ => dir.to_path_buf(),
    };
    let mounts = match below(proc_root, &dir) {
        Ok(m) => m,
        Err(e) => return vec![e.to_string()],
    };
    let mut errors = Vec::new();
    for m in mounts {
        match umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            // EINVAL/ENOENT: already went with a detached parent.
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(errno) => errors.push(format!("{}: umount2: {errno}", m.display())),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_below_deepest_first_and_not_siblings() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("self")).unwrap();
        fs::write(
            t.path().join("self/mountinfo"),
            "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
             50 27 0:5 / /st/i1 rw - tmpfs t rw\n\
             51 50 0:6 / /st/i1/root/x\\040y rw - tmpfs t rw\n\
             52 27 0:7 / /st/i10 rw - tmpfs t rw\n\
             53 50 0:8 / /st/i1/run rw - tmpfs t rw\n",
        )
        .unwrap();
        let got = below(t.path(), Path::new("/st/i1")).unwrap();
        assert_eq!(got[0], PathBuf::from("/st/i1/root/x y"));
        assert_eq!(got[2], PathBuf::from("/st/i1"));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn detaches_real_mounts_with_odd_names() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let dir = t.path().join("inst");
        let odd = dir.join("a b\\c");
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&odd).unwrap();
        use nix::mount::{mount, MsFlags};
        mount(Some(&src), &odd, None::<&str>, MsFlags::MS_BIND, None::<&str>).expect("bind mount (needs root)");
        mount(Some(&src), &odd, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
        assert_eq!(below(Path::new("/proc"), &dir).unwrap().len(), 2);
        let errors = unmount_below(Path::new("/proc"), &dir);
        let left = below(Path::new("/proc"), &dir).unwrap();
        for m in &left {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
        assert!(errors.is_empty() && left.is_empty(), "{errors:?} {left:?}");
    }
}
