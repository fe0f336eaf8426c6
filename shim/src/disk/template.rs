//! The template an instance's image is copied from: one ext4 image per
//! size, made once by `mkfs.ext4` in `<state>/disk-templates/` and reused by
//! every instance (and every agent) of that state dir. Copying it costs
//! about a fifth of running mkfs for each instance (docs/benchmarks.md,
//! figure 7): only its few MiB of metadata are data, the rest is holes,
//! and the copy keeps them holes (SEEK_DATA/SEEK_HOLE + copy_file_range,
//! which also clones extents on filesystems with reflinks).
//!
//! A template belongs to no instance: it is a cache of the state dir, like
//! the lease dir, and stays between agent runs. It is made under a temp
//! name and renamed into place, so a crash never leaves a half-made one
//! where an instance would copy it (stale temp files are removed on the
//! next make). All copies share the template's filesystem UUID, which ext4
//! does not mind (each is mounted from its own loop device).
#![forbid(unsafe_code)]

use super::{io_at, mkfs_path, DiskError, MKFS};
use nix::errno::Errno;
use nix::fcntl::copy_file_range;
use nix::unistd::{lseek, Whence};
use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Dir of the templates inside the state dir.
pub const DIR: &str = "disk-templates";
/// A temp file of a make older than this is a crashed make's.
const STALE: Duration = Duration::from_secs(300);

/// The template for images of `size` bytes in `dir`, made if missing.
pub fn ensure(dir: &Path, size: u64) -> Result<PathBuf, DiskError> {
    let path = dir.join(format!("ext4-{size}.img"));
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    remove_stale(dir);
    let tmp = dir.join(format!(".ext4-{size}.img.tmp-{}-{}", std::process::id(), nanos()));
    let res = make(&tmp, size).and_then(|()| fs::rename(&tmp, &path).map_err(io_at(&path)));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map(|()| path)
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

fn remove_stale(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let old = e.metadata().and_then(|m| m.modified()).map(|t| t.elapsed().unwrap_or_default() > STALE);
        if e.file_name().to_string_lossy().contains(".tmp-") && old.unwrap_or(false) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// mkfs.ext4 of a sparse file: no journal (nothing in it outlives the
/// instance), lazy inode tables, no reserved blocks (the mapped root has
/// no CAP_SYS_RESOURCE in the host's namespace, so it could not use them).
fn make(path: &Path, size: u64) -> Result<(), DiskError> {
    {
        let f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_at(path))?;
        f.set_len(size).map_err(io_at(path))?;
    }
    let out = Command::new(MKFS)
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard"])
        .arg(path)
        .env("PATH", mkfs_path())
        .output()
        .map_err(|e| DiskError::Mkfs { image: path.to_path_buf(), status: "not run".into(), stderr: e.to_string() })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(DiskError::Mkfs { image: path.to_path_buf(), status: out.status.to_string(), stderr });
    }
    // No lost+found in the copies: removing it at each instance's mount
    // was one of the two writes on a fresh filesystem on the start path
    // (docs/benchmarks.md, "A cheaper start"). debugfs comes with mkfs in
    // e2fsprogs; if it fails, `acquire` still removes the dir itself.
    let _ = Command::new("debugfs").args(["-w", "-R", "rmdir lost+found"]).arg(path).env("PATH", mkfs_path()).output();
    Ok(())
}

/// Copies `from` to a new file `to` (mode 0600), keeping holes holes.
pub fn sparse_copy(from: &Path, to: &Path) -> Result<(), DiskError> {
    let src = fs::File::open(from).map_err(io_at(from))?;
    let dst = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(to).map_err(io_at(to))?;
    let len = src.metadata().map_err(io_at(from))?.len();
    dst.set_len(len).map_err(io_at(to))?;
    let sys = |e: Errno| DiskError::Io { path: to.to_path_buf(), source: io::Error::from(e) };
    let mut off = 0i64;
    loop {
        let data = match lseek(&src, off, Whence::SeekData) {
            Ok(d) => d,
            Err(Errno::ENXIO) => return Ok(()),
            Err(e) => return Err(sys(e)),
        };
        let hole = lseek(&src, data, Whence::SeekHole).map_err(sys)?;
        let (mut i, mut o) = (data, data);
        while i < hole {
            let want = (hole - i) as usize;
            match copy_file_range(&src, Some(&mut i), &dst, Some(&mut o), want) {
                Ok(0) => break,
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(sys(e)),
            }
        }
        off = hole;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        let mut f = fs::File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        for at in [0u64, 10 << 20, (64 << 20) - 4096] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[0xab; 4096]).unwrap();
        }
        f.sync_all().unwrap();
        sparse_copy(&a, &b).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        let m = fs::metadata(&b).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(m.blocks() * 512 <= 1 << 20, "holes were filled: {} bytes", m.blocks() * 512);
        assert!(sparse_copy(&a, &b).is_err(), "never overwrites");
    }

    #[test]
    fn a_template_is_made_once_and_reused() {
        let t = tempfile::tempdir().unwrap();
        let p = ensure(&t.path().join(DIR), 32 << 20).unwrap();
        let made = fs::metadata(&p).unwrap().modified().unwrap();
        assert_eq!(ensure(&t.path().join(DIR), 32 << 20).unwrap(), p);
        assert_eq!(fs::metadata(&p).unwrap().modified().unwrap(), made);
        assert_eq!(fs::read_dir(t.path().join(DIR)).unwrap().count(), 1, "no temp file left");
        // Made without lost+found (its removal is off every start).
        let ls = Command::new("debugfs").args(["-R", "ls /"]).arg(&p).env("PATH", mkfs_path()).output().unwrap();
        let ls = String::from_utf8_lossy(&ls.stdout);
        assert!(ls.contains("..") && !ls.contains("lost+found"), "{ls}");
    }
}
