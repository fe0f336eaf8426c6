//! The instance's disk: a sparse ext4 image file inside the instance dir,
//! bound to a loop device (autoclear) and mounted as the daemon's `--root`.
//! Its size is the build's hard disk limit: a write past it fails inside the
//! build with ENOSPC, and the node's filesystem only ever holds the blocks
//! the build really wrote (plus a few MiB of ext4 metadata).
//!
//! Why this mechanism (figures in docs/benchmarks.md, figure 7): project
//! quotas need a filesystem mounted with `prjquota` (and a kernel with quota
//! support: this machine's has none), which the node's state dir rarely is;
//! an image works on any filesystem that holds sparse files; ext4 over xfs
//! because xfs needs 300 MiB at least and allocates its log at once. The image is a sparse
//! copy of a template made once per size by `mkfs.ext4` (shelled out:
//! e2fsprogs is the reference implementation, and `check` looks for it;
//! see `template`), without a journal and with lazy inode tables, mounted
//! with `noinit_itable` so the kernel never zeroes them in the background:
//! a 20 GiB image costs about 4 MiB on the node until the build writes.
//!
//! One place acquires ([`acquire`], called by the agent's spawn after the
//! spec naming the image and mount point is on disk), one releases (the
//! shim's teardown: statfs for the final usage, unmount, and the loop
//! device goes by itself once the mount's last user is gone; the image
//! leaves with the instance dir). `berth-shim delete` runs the same
//! teardown from the spec, so a crash at any point leaves nothing the sweep
//! cannot name.
#![forbid(unsafe_code)]

pub mod spare;
pub mod template;

use crate::steps::Steps;
use crate::sys::loopdev;
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The image file, inside the instance dir (root's, mode 0600).
pub const IMAGE_FILE: &str = "disk.img";
/// The loop device the image was bound to, one line, written after binding.
pub const LOOP_FILE: &str = "disk.loop";
/// The mkfs the images are made with.
pub const MKFS: &str = "mkfs.ext4";
/// Smallest limit an image can have (ext4 without a journal needs little,
/// but a daemon needs room for its own state).
pub const MIN_SIZE: u64 = 16 << 20;
/// The ext4 options of an instance's filesystem.
/// - `noinit_itable`: the kernel would otherwise zero the lazily made
///   inode tables in the background, writing hundreds of MiB into a large
///   image.
/// - `nobarrier`: ext4 sends no cache flushes (nor FUA writes) to the loop
///   device. The loop driver serves each flush with an fsync of the image
///   file, which writes the image's dirty pages to the node's disk and
///   flushes that disk: the mount's own superblock write waited 8-10 ms for
///   one on this machine, and so does every fsync of the build and the
///   unmount. The filesystem is thrown away with the instance (and swept
///   after a node crash), so nothing on it needs to survive a power loss;
///   the data still reaches the image file's page cache at once, and the
///   node's writeback as for any file.
pub const MOUNT_OPTIONS: &str = "noinit_itable,nobarrier";
/// How long [`settle`] waits for the kernel to unbind the loop device after
/// the last user of the mount is gone.
pub const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// The disk part of an instance's spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The sparse image file (inside the instance dir).
    pub image: PathBuf,
    /// Where the image is mounted: the daemon's `--root`.
    pub mount: PathBuf,
    /// The limit: size of the image in bytes.
    pub size_bytes: u64,
}

impl DiskSpec {
    pub fn new(dir: &Path, mount: PathBuf, size_bytes: u64) -> DiskSpec {
        DiskSpec { image: dir.join(IMAGE_FILE), mount, size_bytes }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{image}: {MKFS} failed ({status}): {stderr}")]
    Mkfs { image: PathBuf, status: String, stderr: String },
    #[error("{image}: cannot bind a loop device: {errno} (the agent needs /dev/loop-control and /dev/loop* devices)")]
    Loop { image: PathBuf, errno: Errno },
    #[error("mount {dev} (image {image}) on {mount}: {errno}")]
    Mount { dev: PathBuf, image: PathBuf, mount: PathBuf, errno: Errno },
    #[error("{size} bytes is below the smallest disk limit of {MIN_SIZE} bytes (16Mi)")]
    TooSmall { size: u64 },
}

impl DiskError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            DiskError::Io { .. } => "io",
            DiskError::Mkfs { .. } => "mkfs",
            DiskError::Loop { .. } => "loop",
            DiskError::Mount { .. } => "mount",
            DiskError::TooSmall { .. } => "too_small",
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> DiskError + '_ {
    move |source| DiskError::Io { path: path.to_path_buf(), source }
}

/// Makes the image (a sparse copy of the template for its size in
/// `templates`, made first if missing), binds it and mounts it on
/// `disk.mount` (which must exist), with the filesystem's root owned by
/// `owner` (uid = gid, the instance's mapped root) and mode 0700. Undoes
/// its own steps on failure.
pub fn acquire(disk: &DiskSpec, owner: u32, templates: &Path) -> Result<(), DiskError> {
    acquire_timed(disk, owner, templates, None).map(drop)
}

/// [`acquire`], with the time of each step, and from `spare` (an image
/// already copied and bound, see [`spare`]) when one is given.
pub fn acquire_timed(
    disk: &DiskSpec,
    owner: u32,
    templates: &Path,
    spare: Option<spare::Spare>,
) -> Result<Steps, DiskError> {
    if disk.size_bytes < MIN_SIZE {
        return Err(DiskError::TooSmall { size: disk.size_bytes });
    }
    let mut steps = Steps::new();
    let res = make_and_mount(disk, owner, templates, spare, &mut steps);
    if res.is_err() {
        let _ = umount2(&disk.mount, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
        let _ = fs::remove_file(&disk.image);
    }
    res.map(|()| steps)
}

fn make_and_mount(
    disk: &DiskSpec,
    owner: u32,
    templates: &Path,
    spare: Option<spare::Spare>,
    steps: &mut Steps,
) -> Result<(), DiskError> {
    let image = &disk.image;
    let (dev, held) = match spare {
        // Copied, bound and (mostly) mounted ahead of time: only a rename
        // on this path, then an attach.
        Some(s) => {
            let taken = s.take(image)?;
            steps.mark("spare");
            taken
        }
        None => {
            let template = template::ensure(templates, disk.size_bytes)?;
            template::sparse_copy(&template, image)?;
            steps.mark("copy");
            let file = open(image.as_path(), OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|errno| DiskError::Loop { image: image.clone(), errno })?;
            let (dev, loopfd) =
                loopdev::attach(image, &file).map_err(|errno| DiskError::Loop { image: image.clone(), errno })?;
            drop(file);
            steps.mark("loop");
            (dev, spare::Held::Bound(loopfd))
        }
    };
    let record = image.with_file_name(LOOP_FILE);
    fs::write(&record, format!("{}\n", dev.display())).map_err(io_at(&record))?;
    let mount_err =
        |errno| DiskError::Mount { dev: dev.clone(), image: image.clone(), mount: disk.mount.clone(), errno };
    match held {
        spare::Held::Mounted(mnt) => {
            spare::attach(&mnt, &disk.mount).map_err(mount_err)?;
            steps.mark("attach");
        }
        spare::Held::Bound(loopfd) => {
            mount(Some(&dev), &disk.mount, Some("ext4"), MsFlags::MS_NODEV | MsFlags::MS_NOATIME, Some(MOUNT_OPTIONS))
                .map_err(mount_err)?;
            // From here the mount holds the device; closing our fd lets
            // autoclear unbind it when the mount goes.
            drop(loopfd);
            steps.mark("mount");
        }
    }
    let lost = disk.mount.join("lost+found");
    match fs::remove_dir(&lost) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(DiskError::Io { path: lost, source: e }),
    }
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::lchown(&disk.mount, Some(owner), Some(owner)).map_err(io_at(&disk.mount))?;
    fs::set_permissions(&disk.mount, fs::Permissions::from_mode(0o700)).map_err(io_at(&disk.mount))?;
    steps.mark("own");
    Ok(())
}

/// mkfs.ext4 lives in /sbin or /usr/sbin, which a service's PATH may lack.
fn mkfs_path() -> String {
    let base = std::env::var("PATH").unwrap_or_default();
    format!("{base}:/usr/local/sbin:/usr/sbin:/sbin")
}

/// The instance filesystem's figures, from statfs: no tree walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes in use (blocks not free, metadata included).
    pub used: u64,
    /// Bytes the build can still write.
    pub avail: u64,
    /// Bytes of the filesystem as statfs counts them (after metadata).
    pub size: u64,
}

impl Usage {
    /// True when the build has no room left: under 1% of the filesystem
    /// or 1 MiB free, whichever is more. A write that failed with ENOSPC
    /// leaves it like this until something is deleted.
    pub fn full(&self) -> bool {
        self.avail <= (self.size / 100).max(1 << 20)
    }
}

/// The usage of the filesystem mounted at `mount`, or None when nothing is
/// mounted there (statfs would then report the node's own filesystem).
pub fn usage(mount: &Path) -> Option<Usage> {
    let here = fs::symlink_metadata(mount).ok()?;
    let parent = fs::symlink_metadata(mount.parent()?).ok()?;
    if !here.is_dir() || here.dev() == parent.dev() {
        return None;
    }
    let st = nix::sys::statvfs::statvfs(mount).ok()?;
    let frsize = st.fragment_size() as u64;
    let size = st.blocks() as u64 * frsize;
    let free = st.blocks_free() as u64 * frsize;
    Some(Usage { used: size.saturating_sub(free), avail: st.blocks_available() as u64 * frsize, size })
}

/// What the agent saw of one instance's disk while it ran (kept here, in
/// the library, so the agent's instance and disk modules need not import
/// each other).
#[derive(Debug, Default)]
pub struct Seen {
    peak: AtomicU64,
    /// Times the instance filled its disk (a full sample after one that
    /// was not).
    hits: AtomicU64,
    full: AtomicBool,
}

impl Seen {
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Folds in one sample; true when it is a new fill (a hit).
    pub fn sample(&self, u: &Usage) -> bool {
        self.peak.fetch_max(u.used, Ordering::Relaxed);
        let full = u.full();
        let was = self.full.swap(full, Ordering::Relaxed);
        if full && !was {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// Loop devices bound to a file whose path contains `needle`, from
/// `<sys>/block/loop*/loop/backing_file`: `(device, backing file)`.
pub fn bound_loops(sys_root: &Path, needle: &str) -> Vec<(PathBuf, String)> {
    let Ok(rd) = fs::read_dir(sys_root.join("block")) else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = fs::read_to_string(e.path().join("loop/backing_file")) {
            let backing = backing.trim_end().to_string();
            if backing.contains(needle) {
                out.push((PathBuf::from("/dev").join(&name), backing));
            }
        }
    }
    out
}

/// What names an instance's image in a loop device's backing file, in its
/// dir or after the dir moved to the trash (`.trash-<id>/disk.img`).
pub fn image_needle(disk: &DiskSpec) -> String {
    let dir = disk.image.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
    format!("{}/{IMAGE_FILE}", dir.unwrap_or_default())
}

/// Waits up to [`SETTLE_WAIT`] for every loop device of the instance to be
/// unbound (autoclear runs when the mount's last user is gone: the host
/// mount is detached by then, the daemon's namespace a moment later), and
/// unbinds what is still bound then. Returns a line per device left bound.
pub fn settle(needle: &str) -> Vec<String> {
    let sys = Path::new("/sys");
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        let bound = bound_loops(sys, needle);
        if bound.is_empty() {
            return Vec::new();
        }
        if Instant::now() >= deadline {
            return bound
                .into_iter()
                .map(|(dev, backing)| match loopdev::clear(&dev) {
                    Ok(()) => format!("{}: still bound to {backing} after {SETTLE_WAIT:?}; unbound now", dev.display()),
                    Err(e) => format!("{}: still bound to {backing}: LOOP_CLR_FD: {e}", dev.display()),
                })
                .collect();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether this node can give instances a disk: a way to make the image
/// and loop devices to mount it from. `Err` says what is missing.
pub fn mechanism() -> Result<(), String> {
    mechanism_at(&mkfs_path(), Path::new("/dev/loop-control"))
}

/// [`mechanism`] with the search path and the loop control device given.
pub fn mechanism_at(path_var: &str, loop_control: &Path) -> Result<(), String> {
    let found = path_var.split(':').any(|d| !d.is_empty() && Path::new(d).join(MKFS).is_file());
    if !found {
        return Err(format!("{MKFS} not found on PATH or in /usr/sbin, /sbin (install e2fsprogs)"));
    }
    open(loop_control, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty()).map(drop).map_err(|e| {
        format!(
            "{}: {e} (loop devices are needed: a privileged agent container with the host's /dev, and the loop module loaded)",
            loop_control.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_means_under_one_percent_or_a_mebibyte() {
        let u = |avail, size| Usage { used: size - avail, avail, size };
        assert!(u(0, 64 << 20).full());
        assert!(u(1 << 20, 64 << 20).full());
        assert!(!u(2 << 20, 64 << 20).full());
        assert!(u(100 << 20, 20 << 30).full());
        assert!(!u(300 << 20, 20 << 30).full());
    }

    #[test]
    fn a_hit_is_counted_once_per_fill() {
        let s = Seen::default();
        let u = |avail: u64| Usage { used: (64 << 20) - avail, avail, size: 64 << 20 };
        assert!(!s.sample(&u(30 << 20)));
        assert!(s.sample(&u(0)));
        assert!(!s.sample(&u(0)), "still full: the same hit");
        assert!(!s.sample(&u(40 << 20)));
        assert!(s.sample(&u(100 << 10)), "full again: a new hit");
        assert_eq!(s.hits(), 2);
        assert_eq!(s.peak(), 64 << 20);
    }

    #[test]
    fn needle_names_the_instance_dir_and_image() {
        let d = DiskSpec::new(Path::new("/s/instances/abc"), "/s/instances/abc/root".into(), 1 << 30);
        assert_eq!(d.image, Path::new("/s/instances/abc/disk.img"));
        assert_eq!(image_needle(&d), "abc/disk.img");
        assert!("/s/instances/.trash-abc/disk.img (deleted)".contains(&image_needle(&d)));
    }

    #[test]
    fn usage_is_none_where_nothing_is_mounted() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("root")).unwrap();
        assert_eq!(usage(&t.path().join("root")), None);
        assert_eq!(usage(&t.path().join("missing")), None);
    }

    #[test]
    fn a_missing_mkfs_or_loop_control_is_named() {
        let e = mechanism_at("/nonexistent:/also/not", Path::new("/dev/loop-control")).unwrap_err();
        assert!(e.contains("mkfs.ext4 not found") && e.contains("e2fsprogs"), "{e}");
        let e = mechanism_at(&mkfs_path(), Path::new("/nonexistent/loop-control")).unwrap_err();
        assert!(e.contains("/nonexistent/loop-control") && e.contains("loop module"), "{e}");
    }

    #[test]
    fn too_small_is_refused_before_anything_is_made() {
        let t = tempfile::tempdir().unwrap();
        let d = DiskSpec::new(t.path(), t.path().join("root"), 1 << 20);
        assert!(matches!(acquire(&d, 1 << 20, t.path()), Err(DiskError::TooSmall { .. })));
        assert!(!d.image.exists());
    }
}
