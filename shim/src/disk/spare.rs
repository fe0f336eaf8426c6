//! Spare images: sparse copies of the template, bound to a loop device and
//! mounted, detached, ahead of time off the start path, so that an
//! instance's [`acquire`](super::acquire_timed) is a rename and an attach.
//! The copy, `LOOP_CONFIGURE` and the ext4 mount are the slow steps of the
//! disk (the ioctl takes 0.5 ms on a quiet device and up to hundreds of ms
//! right after another device was released; the mount 1-2 ms, and 8-12 ms
//! while a flush was on its way to the node's disk: docs/benchmarks.md,
//! figure 1's breakdown).
//!
//! The mount is made with the new mount API (`fsopen`, `fsconfig`,
//! `fsmount`): the filesystem is mounted but attached nowhere, held only by
//! the agent's mount fd, until a start attaches it (`move_mount`) on the
//! instance's root. A kernel or seccomp profile without that API (before
//! 5.2) gets spares that are only bound, mounted at the start as before.
//!
//! A spare belongs to one agent (a dir `<state>/disk-spares/<owner>/`, the
//! owner being the agent's lock id, see the agent's `owner` module) and is
//! never reachable by any path before an instance takes it, so it holds
//! nothing of any build: a fresh filesystem per build, as without spares.
//! It is taken by one instance only (the agent's pool hands each out once),
//! renamed into that instance's dir before it is attached, and from then
//! on is the instance's image like any other: the instance's teardown
//! releases it.
//!
//! Crash safety: the device is bound with autoclear and only the agent
//! holds it, through its loop fd or its detached mount's fd (both
//! close-on-exec, and a detached mount goes with its last fd), so the
//! kernel unmounts and unbinds it when the agent dies, however it dies; the
//! image files left in a dead agent's dir are removed by [`sweep`] at the
//! next agent's start. Unused spares are dropped (unmounted, unbound and
//! unlinked) when the agent ends.
#![forbid(unsafe_code)]

use super::{io_at, template, DiskError, MOUNT_OPTIONS};
use crate::sys::loopdev;
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use rustix::mount::{
    fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount, FsMountFlags, FsOpenFlags,
    MountAttrFlags, MoveMountFlags,
};
use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Dir of the agents' spare dirs inside the state dir.
pub const DIR: &str = "disk-spares";

/// What keeps a spare's device: its loop fd, or the fd of its filesystem
/// mounted ahead (detached).
#[derive(Debug)]
pub enum Held {
    /// Bound only: the start mounts it.
    Bound(OwnedFd),
    /// Mounted, attached nowhere: the start attaches it ([`attach`]).
    Mounted(OwnedFd),
}

/// One spare image, bound to `dev` (and mounted, detached, when the kernel
/// allows) while `held` is open.
#[derive(Debug)]
pub struct Spare {
    image: PathBuf,
    dev: PathBuf,
    held: Option<Held>,
    size: u64,
    /// Why it is bound only, when the mount ahead was refused.
    unmounted: Option<String>,
}

impl Spare {
    /// Copies the template for `size` (made first if missing) to a new file
    /// in `dir` (which must exist), binds it to a free loop device and
    /// mounts it, detached.
    pub fn make(dir: &Path, templates: &Path, size: u64, seq: u64) -> Result<Spare, DiskError> {
        let template = template::ensure(templates, size)?;
        let image = dir.join(format!("spare-{size}-{seq}.img"));
        template::sparse_copy(&template, &image)?;
        let bound = open(image.as_path(), OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .and_then(|file| loopdev::attach(&image, &file));
        let (dev, loopfd) = match bound {
            Ok(b) => b,
            Err(errno) => {
                let _ = fs::remove_file(&image);
                return Err(DiskError::Loop { image, errno });
            }
        };
        let (held, unmounted) = match mount_detached(&dev) {
            // The filesystem holds the device now; the loop fd can go.
            Ok(mnt) => (Held::Mounted(mnt), None),
            Err(e) => {
                let errno = Errno::from_raw(e.raw_os_error());
                (Held::Bound(loopfd), Some(format!("{}: fsopen/fsmount: {errno}", dev.display())))
            }
        };
        Ok(Spare { image, dev, held: Some(held), size, unmounted })
    }

    /// The size of the image (the disk limit it serves).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The loop device it is bound to.
    pub fn dev(&self) -> &Path {
        &self.dev
    }

    /// Why the filesystem was not mounted ahead (None: it was).
    pub fn unmounted(&self) -> Option<&str> {
        self.unmounted.as_deref()
    }

    /// Moves the image to `to` (an instance's image path, on the same
    /// filesystem) and hands over the device and what holds it. The device
    /// follows the file: its `backing_file` names the new path.
    pub fn take(mut self, to: &Path) -> Result<(PathBuf, Held), DiskError> {
        fs::rename(&self.image, to).map_err(io_at(to))?;
        self.image = PathBuf::new();
        let held = self.held.take().expect("a spare holds its device until taken");
        Ok((std::mem::take(&mut self.dev), held))
    }
}

impl Drop for Spare {
    /// An unused spare: its fd closes (the detached mount goes, and
    /// autoclear unbinds the device) and its file goes.
    fn drop(&mut self) {
        drop(self.held.take());
        if !self.image.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.image);
        }
    }
}

/// The instance filesystem on `dev`, mounted with [`MOUNT_OPTIONS`] and
/// the start's nodev and noatime, attached nowhere.
fn mount_detached(dev: &Path) -> rustix::io::Result<OwnedFd> {
    let fs = fsopen("ext4", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, "source", dev)?;
    for flag in MOUNT_OPTIONS.split(',') {
        fsconfig_set_flag(&fs, flag)?;
    }
    fsconfig_create(&fs)?;
    fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOATIME)
}

/// Attaches a spare's detached filesystem on `at` (an empty dir).
pub fn attach(mnt: &OwnedFd, at: &Path) -> Result<(), Errno> {
    move_mount(mnt, "", rustix::fs::CWD, at, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .map_err(|e| Errno::from_raw(e.raw_os_error()))
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
