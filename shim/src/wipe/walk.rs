//! The iterative walk behind [`super::remove_tree`]: a stack of directory
//! frames, each with the names still to remove, processed depth first.

use super::ops::{list, mnt_id, open_dir, remove, Boundary, Names, DIR_FLAGS};
use super::{WipeError, FD_WINDOW, MAX_UMOUNTS};
use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{umount2, MntFlags};
use nix::sys::stat::{fstat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One directory on the current path.
struct Frame {
    /// Its name in the parent (for the top: the final component of the path).
    name: CString,
    /// Open while within [`FD_WINDOW`] of the deepest frame.
    dir: Option<Dir>,
    /// Identity, to check a reopen through `..` found the same directory.
    dev: u64,
    ino: u64,
    /// Entries not yet removed.
    pending: Names,
    /// Errors recorded before entering it: more at the end means its rmdir
    /// will fail with ENOTEMPTY, which is then not worth a line of its own.
    errors_before: usize,
}

pub(super) struct Walk {
    top: PathBuf,
    /// The directory holding the top; its rmdir happens there.
    base: OwnedFd,
    bound: Boundary,
    stack: Vec<Frame>,
    errors: Vec<WipeError>,
}

impl Walk {
    /// Wipes `dir`; returns the errors met along the way (empty: all gone).
    pub(super) fn run(dir: &Path, try_openat2: bool) -> Result<Vec<WipeError>, WipeError> {
        let bad = || WipeError::BadPath { path: dir.to_path_buf() };
        let name = dir.file_name().ok_or_else(bad)?;
        let name = CString::new(name.as_bytes()).map_err(|_| bad())?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let base = match open(parent, DIR_FLAGS.difference(OFlag::O_NOFOLLOW), Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(Vec::new()),
            Err(errno) => return Err(WipeError::Sys { path: parent.to_path_buf(), op: "open", errno }),
        };
        let mut bound = Boundary { openat2: try_openat2, top_dev: 0, top_mnt: None };
        let top = match open_dir(base.as_fd(), &name, &bound, false) {
            Err(Errno::ENOSYS) => {
                bound.openat2 = false;
                open_dir(base.as_fd(), &name, &bound, false)
            }
            r => r,
        };
        let mut walk = Walk { top: dir.to_path_buf(), base, bound, stack: Vec::new(), errors: Vec::new() };
        match top {
            Ok(fd) => {
                let st = fstat(&fd).map_err(|errno| WipeError::Sys { path: dir.to_path_buf(), op: "fstat", errno })?;
                walk.bound.top_dev = st.st_dev;
                if !walk.bound.openat2 {
                    walk.bound.top_mnt = mnt_id(&fd);
                }
                walk.push(name, fd, st.st_dev, st.st_ino);
                walk.drain();
            }
            Err(Errno::ENOENT) => {}
            // The instance dir itself is a symlink or a file: unlink it.
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                if let Err(e) = remove(walk.base.as_fd(), &name, dir.to_path_buf(), false) {
                    walk.errors.push(e);
                }
            }
            Err(errno) => return Err(WipeError::Sys { path: dir.to_path_buf(), op: "open", errno }),
        }
        Ok(walk.errors)
    }

    fn drain(&mut self) {
        while let Some(frame) = self.stack.last_mut() {
            match frame.pending.pop() {
                Some((name, ty)) => self.entry(name, ty),
                None => self.leave(),
            }
        }
    }

    /// The deepest frame's fd; always open (only shallower ones are closed).
    fn cur(&self) -> BorrowedFd<'_> {
        self.stack.last().and_then(|f| f.dir.as_ref()).map(|d| d.as_fd()).expect("deepest frame is open")
    }

    /// Path of the frame at `depth` (0 = top) joined with `name`, for errors
    /// and for umount2, which takes a path.
    fn path(&self, depth: usize, name: Option<&CStr>) -> PathBuf {
        let mut p = self.top.clone();
        for f in self.stack.iter().take(depth + 1).skip(1) {
            p.push(OsStr::from_bytes(f.name.to_bytes()));
        }
        if let Some(n) = name {
            p.push(OsStr::from_bytes(n.to_bytes()));
        }
        p
    }

    fn push(&mut self, name: CString, fd: OwnedFd, dev: u64, ino: u64) {
        let errors_before = self.errors.len();
        let mut pending = Vec::new();
        let dir = match Dir::from_fd(fd) {
            Ok(mut d) => {
                match list(&mut d) {
                    Ok(n) => pending = n,
                    Err(errno) => {
                        let path = self.path(self.stack.len(), Some(&name));
                        self.errors.push(WipeError::Sys { path, op: "readdir", errno });
                    }
                }
                Some(d)
            }
            Err(errno) => {
                let path = self.path(self.stack.len(), Some(&name));
                self.errors.push(WipeError::Sys { path, op: "fdopendir", errno });
                return;
            }
        };
        self.stack.push(Frame { name, dir, dev, ino, pending, errors_before });
        if let Some(i) = self.stack.len().checked_sub(FD_WINDOW + 1) {
            self.stack[i].dir = None;
        }
    }

    /// One entry of the deepest directory: unlinked if it is not a
    /// directory, entered if it is one on the same mount.
    fn entry(&mut self, name: CString, ty: Option<Type>) {
        if ty != Some(Type::Directory) {
            match unlinkat(self.cur(), name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => return,
                // d_type was unknown (or stale) and it is a directory.
                Err(Errno::EISDIR) => {}
                // EBUSY (a file bind-mounted over) and the like.
                Err(_) => {
                    let path = self.path(self.stack.len() - 1, Some(&name));
                    if let Err(e) = remove(self.cur(), &name, path, false) {
                        self.errors.push(e);
                    }
                    return;
                }
            }
        }
        let mut tries = 0;
        loop {
            let opened = open_dir(self.cur(), &name, &self.bound, true);
            let path = || self.path(self.stack.len() - 1, Some(&name));
            match opened {
                Ok(fd) => {
                    match fstat(&fd) {
                        Ok(st) => self.push(name, fd, st.st_dev, st.st_ino),
                        Err(errno) => self.errors.push(WipeError::Sys { path: path(), op: "fstat", errno }),
                    }
                    return;
                }
                Err(Errno::ENOENT) => return,
                // A symlink (or file) where a directory was listed: unlink it.
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    if let Err(errno) = unlinkat(self.cur(), name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                        if errno != Errno::ENOENT {
                            self.errors.push(WipeError::Sys { path: path(), op: "unlink", errno });
                        }
                    }
                    return;
                }
                Err(Errno::EXDEV) if tries < MAX_UMOUNTS => {
                    let p = path();
                    tries += 1;
                    match umount2(&p, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                        Ok(()) => continue,
                        // Not a mount point, yet another device (a btrfs
                        // subvolume seen by the st_dev fallback): leave it.
                        Err(Errno::EINVAL) => {
                            self.errors.push(WipeError::OtherMount { path: p, tries });
                        }
                        Err(errno) => self.errors.push(WipeError::Sys { path: p, op: "umount2", errno }),
                    }
                    return;
                }
                Err(Errno::EXDEV) => {
                    self.errors.push(WipeError::OtherMount { path: path(), tries });
                    return;
                }
                Err(errno) => {
                    self.errors.push(WipeError::Sys { path: path(), op: "open", errno });
                    return;
                }
            }
        }
    }

    /// The deepest directory is empty (or as empty as it gets): close it
    /// and rmdir it in its parent, reopening the parent if it was closed.
    fn leave(&mut self) {
        let frame = self.stack.pop().expect("leave with a frame");
        let depth = self.stack.len();
        let mine = frame.dir.expect("deepest frame is open");
        if depth > 0 && self.stack[depth - 1].dir.is_none() {
            // Out of the fd window: reopen the parent through "..", and make
            // sure it is the very directory we left (nothing was moved).
            let up = self.path(depth - 1, None);
            let want = (self.stack[depth - 1].dev, self.stack[depth - 1].ino);
            let reopened = open_dir(mine.as_fd(), c"..", &self.bound, true)
                .and_then(|fd| fstat(&fd).map(|st| (fd, (st.st_dev, st.st_ino))));
            let err = match reopened {
                Ok((fd, got)) if got == want => match Dir::from_fd(fd) {
                    Ok(d) => {
                        self.stack[depth - 1].dir = Some(d);
                        None
                    }
                    Err(errno) => Some(WipeError::Sys { path: up, op: "fdopendir", errno }),
                },
                Ok(_) => Some(WipeError::Moved { path: up }),
                Err(errno) => Some(WipeError::Sys { path: up, op: "open ..", errno }),
            };
            if let Some(e) = err {
                // Lost our place: stop rather than guess.
                self.errors.push(e);
                self.stack.clear();
                return;
            }
        }
        drop(mine);
        let path = self.path(depth.saturating_sub(1), (depth > 0).then_some(frame.name.as_c_str()));
        let parent = match depth {
            0 => self.base.as_fd(),
            _ => self.stack[depth - 1].dir.as_ref().expect("reopened above").as_fd(),
        };
        match remove(parent, &frame.name, path, true) {
            Ok(()) => {}
            // An rmdir that failed only because something below stayed adds
            // no information: the thing below is already named.
            Err(WipeError::Sys { errno: Errno::ENOTEMPTY, .. }) if self.errors.len() > frame.errors_before => {}
            Err(e) => self.errors.push(e),
        }
    }
}
