//! The agent's few direct system calls, in one place. All go through nix,
//! so this module needs no unsafe code.

use nix::sys::signal::{kill, Signal};
use nix::unistd::{chown, Gid, Pid, Uid};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// chown that says which path failed.
pub fn chown_path(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    chown(path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("chown {} to {uid}:{gid}: {e}", path.display())))
}

pub fn chmod(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io::Error::new(e.kind(), format!("chmod {:o} {}: {e}", mode, path.display())))
}

/// Sends a signal; a process that is already gone is not an error.
pub fn signal(pid: u32, sig: Signal) -> io::Result<()> {
    match kill(Pid::from_raw(pid as i32), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(io::Error::new(io::Error::from(e).kind(), format!("kill -{sig} {pid}: {e}"))),
    }
}

pub use berth_shim::host::random_id;

/// Every ancestor of `path` must let "others" search it, or the instance's
/// mapped root (an unprivileged host uid) cannot reach its own dirs.
pub fn check_traversable(path: &Path) -> Result<(), String> {
    let mut cur = Some(path);
    while let Some(p) = cur {
        if let Ok(meta) = std::fs::metadata(p) {
            if meta.permissions().mode() & 0o001 == 0 {
                return Err(format!(
                    "{} has mode {:o}: the instances' mapped uids cannot traverse it; run chmod o+x {}",
                    p.display(),
                    meta.permissions().mode() & 0o7777,
                    p.display()
                ));
            }
        }
        cur = p.parent();
    }
    Ok(())
}

/// The filesystem type of `path`, by statfs magic, for the state-dir check.
pub fn fs_type(path: &Path) -> io::Result<String> {
    use nix::sys::statfs::{
        statfs, BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, OVERLAYFS_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC,
    };
    let t = statfs(path).map_err(io::Error::from)?.filesystem_type();
    Ok(match t {
        t if t == OVERLAYFS_SUPER_MAGIC => "overlayfs".into(),
        t if t == TMPFS_MAGIC => "tmpfs".into(),
        t if t == EXT4_SUPER_MAGIC => "ext4".into(),
        t if t == XFS_SUPER_MAGIC => "xfs".into(),
        t if t == BTRFS_SUPER_MAGIC => "btrfs".into(),
        other => format!("fs magic {:#x}", other.0),
    })
}

/// Bind-mounts the directory `src` onto `target` (MS_BIND, not recursive:
/// only the socket dir itself goes into the pod).
pub fn bind_mount(src: &Path, target: &Path) -> io::Result<()> {
    use nix::mount::{mount, MsFlags};
    mount(Some(src), target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| {
        io::Error::new(io::Error::from(e).kind(), format!("bind mount {} on {}: {e}", src.display(), target.display()))
    })
}

/// Unmounts `target`; "not mounted" is success, so unpublish is idempotent.
pub fn unmount(target: &Path) -> io::Result<()> {
    use nix::mount::{umount2, MntFlags};
    match umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        // Busy: a process still has it open; detach so it goes when they do.
        Err(nix::errno::Errno::EBUSY) => umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("umount -l {}: {e}", target.display()))),
        Err(e) => Err(io::Error::new(io::Error::from(e).kind(), format!("umount {}: {e}", target.display()))),
    }
}

pub use berth_shim::mountinfo::MountEntry;

/// Mounts of this mount namespace (parsed by the shim library's `mountinfo`).
pub fn mounts(proc_root: &Path) -> Vec<MountEntry> {
    berth_shim::mountinfo::read(proc_root).unwrap_or_default()
}
