//! Removes an instance's directory tree without ever leaving it.
//!
//! The tree was written by a daemon we do not trust (mapped root inside its
//! user namespace), so it may hold symlinks pointing anywhere, directories
//! with mode 000, names with any bytes, very deep chains, and mounts. The
//! rules:
//! - every lookup is relative to an open directory fd (openat/unlinkat), so
//!   no path is re-resolved from the top and no intermediate symlink is met;
//! - a directory is opened with O_NOFOLLOW and RESOLVE_NO_SYMLINKS: a
//!   symlink, even one planted where a directory was, is unlinked, never
//!   followed;
//! - a directory on another mount is never entered. Mount boundaries come
//!   from openat2(RESOLVE_NO_XDEV), which sees every mount including bind
//!   mounts of the same filesystem; comparing st_dev alone would miss those
//!   (a bind mount of another dir of the same ext4 has the same st_dev). On
//!   kernels without openat2 (< 5.6, or a seccomp filter returning ENOSYS)
//!   the mount id from `/proc/self/fdinfo` is compared instead, and st_dev
//!   when that is unreadable. (With openat2, a different st_dev on the same
//!   mount, a btrfs subvolume, is entered: it is part of the tree, and
//!   root may rmdir it once empty.) A mount found inside is lazily unmounted
//!   (MNT_DETACH), a few times for stacked mounts, and left in place with an
//!   error naming it if it stays.
//!
//! Depth is unbounded and descriptors are bounded: the walk is iterative
//! (no Rust recursion to overflow) and keeps at most [`FD_WINDOW`] directory
//! fds open; deeper ancestors are closed and reopened through `..` on the
//! way back, checked against their recorded device and inode. Memory is one
//! name list per level of the current path.

mod ops;
#[cfg(test)]
mod tests;
mod walk;

use nix::errno::Errno;
use std::path::{Path, PathBuf};

/// Directory fds kept open at most; deeper levels are reopened via `..`.
pub const FD_WINDOW: usize = 64;
/// Lazy unmounts tried on one mount point (mounts may be stacked).
pub const MAX_UMOUNTS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum WipeError {
    #[error("{path}: {op}: {errno}")]
    Sys { path: PathBuf, op: &'static str, errno: Errno },
    #[error("{path}: another filesystem is still mounted here after {tries} lazy unmounts; left in place")]
    OtherMount { path: PathBuf, tries: usize },
    #[error("{path}: the tree changed during the wipe ('..' is not the directory we came from); stopped")]
    Moved { path: PathBuf },
    #[error("{path}: refusing to wipe a path without a final component")]
    BadPath { path: PathBuf },
    #[error("{path}: not fully removed: {}", join(errors))]
    Incomplete { path: PathBuf, errors: Vec<WipeError> },
}

fn join(errors: &[WipeError]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
}

impl WipeError {
    /// One line per problem, each naming its path, for `Outcome.leftovers`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            WipeError::Incomplete { errors, .. } => errors.iter().flat_map(|e| e.lines()).collect(),
            e => vec![e.to_string()],
        }
    }
}

/// Removes `dir` and everything below it on the same mount. A `dir` that
/// does not exist is success (wipes are idempotent); a `dir` that is a
/// symlink or a file is unlinked, its target untouched. Keeps going past
/// errors and reports all of them.
pub fn remove_tree(dir: &Path) -> Result<(), WipeError> {
    remove_tree_with(dir, true)
}

/// [`remove_tree`], optionally without openat2, to test the fallback.
fn remove_tree_with(dir: &Path, openat2: bool) -> Result<(), WipeError> {
    let mut errors = walk::Walk::run(dir, openat2)?;
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(WipeError::Incomplete { path: dir.to_path_buf(), errors }),
    }
}
