//! Spare images: sparse copies of the template, already bound to a loop
//! device, made ahead of time off the start path, so that an instance's
//! [`acquire`](super::acquire_timed) is a rename and a mount. The copy and
//! above all `LOOP_CONFIGURE` are the slow steps of the disk (the ioctl
//! takes 0.5 ms on a quiet device and up to hundreds of ms right after
//! another device was released; docs/benchmarks.md, figure 1's breakdown).
//!
//! A spare belongs to one agent (a dir `<state>/disk-spares/<owner>/`, the
//! owner being the agent's lock id, see the agent's `owner` module) and is
//! never mounted before an instance takes it, so it holds nothing of any
//! build: a fresh filesystem per build, as without spares. It is taken by
//! one instance only (the agent's pool hands each out once), renamed into
//! that instance's dir before the mount, and from then on is the instance's
//! image like any other: the instance's teardown releases it.
//!
//! Crash safety: the device is bound with autoclear and only the agent
//! holds it open (close-on-exec), so the kernel unbinds it when the agent
//! dies, however it dies; the image files left in a dead agent's dir are
//! removed by [`sweep`] at the next agent's start. Unused spares are
//! dropped (unbound and unlinked) when the agent ends.
#![forbid(unsafe_code)]

use super::{io_at, template, DiskError};
use crate::sys::loopdev;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Dir of the agents' spare dirs inside the state dir.
pub const DIR: &str = "disk-spares";

/// One spare image, bound to `dev` while `loopfd` is open.
#[derive(Debug)]
pub struct Spare {
    image: PathBuf,
    dev: PathBuf,
    loopfd: Option<OwnedFd>,
    size: u64,
}

impl Spare {
    /// Copies the template for `size` (made first if missing) to a new file
    /// in `dir` (which must exist) and binds it to a free loop device.
    pub fn make(dir: &Path, templates: &Path, size: u64, seq: u64) -> Result<Spare, DiskError> {
        let template = template::ensure(templates, size)?;
        let image = dir.join(format!("spare-{size}-{seq}.img"));
        template::sparse_copy(&template, &image)?;
        let bound = open(image.as_path(), OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .and_then(|file| loopdev::attach(&image, &file));
        match bound {
            Ok((dev, loopfd)) => Ok(Spare { image, dev, loopfd: Some(loopfd), size }),
            Err(errno) => {
                let _ = fs::remove_file(&image);
                Err(DiskError::Loop { image, errno })
            }
        }
    }

    /// The size of the image (the disk limit it serves).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The loop device it is bound to.
    pub fn dev(&self) -> &Path {
        &self.dev
    }

    /// Moves the image to `to` (an instance's image path, on the same
    /// filesystem) and hands over the device and the fd that keeps it
    /// bound. The device follows the file: its `backing_file` names the
    /// new path.
    pub fn take(mut self, to: &Path) -> Result<(PathBuf, OwnedFd), DiskError> {
        fs::rename(&self.image, to).map_err(io_at(to))?;
        self.image = PathBuf::new();
        let fd = self.loopfd.take().expect("a spare holds its fd until taken");
        Ok((std::mem::take(&mut self.dev), fd))
    }
}

impl Drop for Spare {
    /// An unused spare: its fd closes (autoclear unbinds the device, which
    /// nothing mounted) and its file goes.
    fn drop(&mut self) {
        drop(self.loopfd.take());
        if !self.image.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.image);
        }
    }
}

/// The spare dir of agent `owner` in `state`.
pub fn dir_of(state: &Path, owner: &str) -> PathBuf {
    state.join(DIR).join(owner)
}

/// Removes the spare dirs of agents that are gone (`alive(owner)` false).
/// Their devices were unbound by the kernel when the agent's fds closed.
/// Returns the image files removed.
pub fn sweep(state: &Path, alive: impl Fn(&str) -> bool) -> usize {
    let Ok(rd) = fs::read_dir(state.join(DIR)) else { return 0 };
    let mut n = 0;
    for e in rd.flatten() {
        let owner = e.file_name().to_string_lossy().into_owned();
        if alive(&owner) {
            continue;
        }
        n += fs::read_dir(e.path()).map(|rd| rd.count()).unwrap_or(0);
        let _ = fs::remove_dir_all(e.path());
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_keeps_live_owners_and_removes_the_rest() {
        let t = tempfile::tempdir().unwrap();
        for owner in ["agent-1-a", "agent-2-b"] {
            let d = dir_of(t.path(), owner);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("spare-1-0.img"), b"x").unwrap();
        }
        assert_eq!(sweep(t.path(), |o| o == "agent-2-b"), 1);
        assert!(!dir_of(t.path(), "agent-1-a").exists());
        assert!(dir_of(t.path(), "agent-2-b").join("spare-1-0.img").exists());
        assert_eq!(sweep(&t.path().join("missing"), |_| false), 0);
    }
}
