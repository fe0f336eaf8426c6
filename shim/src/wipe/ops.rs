//! The single-entry operations of the wipe: open a directory without
//! following symlinks or crossing mounts, list it, remove an entry.

use super::{WipeError, MAX_UMOUNTS};
use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{umount2, MntFlags};
use nix::sys::stat::{fchmodat, fstat, FchmodatFlags, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::ffi::{CStr, CString};
use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

pub(super) type Names = Vec<(CString, Option<Type>)>;

/// How mount boundaries are detected, fixed at the top of the tree.
#[derive(Clone, Copy)]
pub(super) struct Boundary {
    /// openat2 with RESOLVE_NO_XDEV works; otherwise compare ids after open.
    pub openat2: bool,
    pub top_dev: u64,
    pub top_mnt: Option<u64>,
}

pub(super) const DIR_FLAGS: OFlag =
    OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

/// Opens `name` under `parent` as a directory without following a symlink
/// and, with `same_mount`, fails with EXDEV if it is on another mount. A
/// directory we may not open (mode 000 without CAP_DAC_OVERRIDE) is made
/// 0700 and retried once.
pub(super) fn open_dir(parent: BorrowedFd, name: &CStr, b: &Boundary, same_mount: bool) -> Result<OwnedFd, Errno> {
    let attempt = || {
        if b.openat2 {
            let mut resolve = ResolveFlag::RESOLVE_NO_SYMLINKS;
            if same_mount {
                resolve |= ResolveFlag::RESOLVE_NO_XDEV;
            }
            openat2(parent, name, OpenHow::new().flags(DIR_FLAGS).resolve(resolve))
        } else {
            openat(parent, name, DIR_FLAGS, Mode::empty())
        }
    };
    let fd = match attempt() {
        Err(Errno::EACCES) => {
            // NoFollow needs /proc or fchmodat2; a symlink here would have
            // failed the open with ELOOP, so following is a fallback only.
            let m = Mode::from_bits_truncate(0o700);
            if fchmodat(parent, name, m, FchmodatFlags::NoFollowSymlink).is_err() {
                fchmodat(parent, name, m, FchmodatFlags::FollowSymlink)?;
            }
            attempt()?
        }
        r => r?,
    };
    if same_mount && !b.openat2 {
        let crossed = match (b.top_mnt, mnt_id(&fd)) {
            (Some(top), Some(here)) => top != here,
            _ => fstat(&fd)?.st_dev != b.top_dev,
        };
        if crossed {
            return Err(Errno::EXDEV);
        }
    }
    Ok(fd)
}

/// The mount id of an open fd, from `/proc/self/fdinfo` (Linux 3.15+).
pub(super) fn mnt_id(fd: &OwnedFd) -> Option<u64> {
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines().find_map(|l| l.strip_prefix("mnt_id:")).and_then(|v| v.trim().parse().ok())
}

pub(super) fn list(dir: &mut Dir) -> Result<Names, Errno> {
    let mut names = Vec::new();
    for e in dir.iter() {
        let e = e?;
        let n = e.file_name();
        if n == c"." || n == c".." {
            continue;
        }
        names.push((n.to_owned(), e.file_type()));
    }
    Ok(names)
}

/// unlinkat (rmdir with `dir`), lazily unmounting a mount on the entry
/// first when it is busy (a file or directory that is itself a mount point).
pub(super) fn remove(parent: BorrowedFd, name: &CStr, path: PathBuf, dir: bool) -> Result<(), WipeError> {
    let (op, flag) = match dir {
        true => ("rmdir", UnlinkatFlags::RemoveDir),
        false => ("unlink", UnlinkatFlags::NoRemoveDir),
    };
    for _ in 0..=MAX_UMOUNTS {
        match unlinkat(parent, name, flag) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EBUSY) => {
                match umount2(&path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                    Ok(()) => {}
                    // Busy, but not a mount point: report the EBUSY.
                    Err(Errno::EINVAL) => return Err(WipeError::Sys { path, op, errno: Errno::EBUSY }),
                    Err(errno) => return Err(WipeError::Sys { path, op: "umount2", errno }),
                }
            }
            Err(errno) => return Err(WipeError::Sys { path, op, errno }),
        }
    }
    Err(WipeError::OtherMount { path, tries: MAX_UMOUNTS })
}
