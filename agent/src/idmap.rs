//! The id-map pool: disjoint 65536-id ranges for instances, leased on disk.
//!
//! A lease is a file `<state>/leases/<host_base>` created with O_EXCL, so two
//! agents on one node (a rollout with maxSurge) never hand out the same range,
//! and a crashed agent's leases are visible to the next one's sweep. The shim
//! removes the lease as the very last step of its wipe.

use berth_shim::spec::{IdRange, IDS_PER_INSTANCE};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum IdmapError {
    #[error("--idmap-count {0} is not a positive multiple of {IDS_PER_INSTANCE}")]
    Count(u32),
    #[error("--idmap-base {base} + --idmap-count {count} overflows the 32-bit id space")]
    Overflow { base: u32, count: u32 },
    #[error("--idmap-base {base} puts a host id in the pool: {what} uses id {id}; move the pool clear of it")]
    HostIds { base: u32, what: String, id: u32 },
    #[error("all {0} id ranges of the pool are leased; raise --idmap-count or lower the concurrency")]
    Exhausted(u32),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub struct IdPool {
    base: u32,
    ranges: u32,
    dir: PathBuf,
    /// Where the next search starts, so ranges rotate rather than a freed
    /// range being reused at once.
    cursor: AtomicU32,
}

impl IdPool {
    /// Validates the pool against the host's own ids (`/etc/passwd`,
    /// `/etc/group` under `etc`) and prepares the lease dir.
    pub fn new(base: u32, count: u32, leases: PathBuf, etc: &Path) -> Result<IdPool, IdmapError> {
        if count == 0 || !count.is_multiple_of(IDS_PER_INSTANCE) {
            return Err(IdmapError::Count(count));
        }
        if base.checked_add(count - 1).is_none() {
            return Err(IdmapError::Overflow { base, count });
        }
        let end = base as u64 + count as u64;
        let clash = host_ids(etc).into_iter().find(|(_, id)| (*id as u64) >= base as u64 && (*id as u64) < end);
        if let Some((what, id)) = clash {
            return Err(IdmapError::HostIds { base, what, id });
        }
        fs::create_dir_all(&leases).map_err(|source| IdmapError::Io { path: leases.clone(), source })?;
        Ok(IdPool { base, ranges: count / IDS_PER_INSTANCE, dir: leases, cursor: AtomicU32::new(0) })
    }

    pub fn capacity(&self) -> u32 {
        self.ranges
    }

    pub fn lease_path(&self, range: &IdRange) -> PathBuf {
        self.dir.join(range.host_base.to_string())
    }

    /// Leases a free range for instance `id`.
    pub fn lease(&self, id: &str) -> Result<(IdRange, PathBuf), IdmapError> {
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        for i in 0..self.ranges {
            let slot = (start + i) % self.ranges;
            let range = IdRange { host_base: self.base + slot * IDS_PER_INSTANCE, count: IDS_PER_INSTANCE };
            let path = self.lease_path(&range);
            match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(id.as_bytes()).map_err(|source| IdmapError::Io { path: path.clone(), source })?;
                    self.cursor.store(slot + 1, Ordering::Relaxed);
                    return Ok((range, path));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(IdmapError::Io { path, source }),
            }
        }
        Err(IdmapError::Exhausted(self.ranges))
    }

    /// Leases on disk: `(path, instance id)`; for the sweep.
    pub fn leases(&self) -> Vec<(PathBuf, String)> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten().map(|e| (e.path(), fs::read_to_string(e.path()).unwrap_or_default())).collect()
    }
}

/// Every uid and gid named in the host's passwd and group files, except
/// `nobody` (65534), which is conventionally below any pool.
fn host_ids(etc: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for file in ["passwd", "group"] {
        let path = etc.join(file);
        let Ok(text) = fs::read_to_string(&path) else { continue };
        for line in text.lines() {
            let mut f = line.split(':');
            let name = f.next().unwrap_or("");
            if let Some(id) = f.nth(1).and_then(|s| s.parse::<u32>().ok()).filter(|id| *id != 65534) {
                out.push((format!("{} entry {name:?}", path.display()), id));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(dir: &Path, base: u32, count: u32) -> Result<IdPool, IdmapError> {
        IdPool::new(base, count, dir.join("leases"), &dir.join("etc"))
    }

    #[test]
    fn leases_are_disjoint_exclusive_and_bounded() {
        let t = tempfile::tempdir().unwrap();
        let p = pool(t.path(), 1 << 20, 3 * 65536).unwrap();
        let (a, pa) = p.lease("a").unwrap();
        let (b, _) = p.lease("b").unwrap();
        let (c, _) = p.lease("c").unwrap();
        assert!(!a.overlaps(&b) && !b.overlaps(&c) && !a.overlaps(&c));
        assert!(matches!(p.lease("d"), Err(IdmapError::Exhausted(3))));
        // A second agent on the same dir sees the leases.
        let p2 = pool(t.path(), 1 << 20, 3 * 65536).unwrap();
        assert!(p2.lease("e").is_err());
        fs::remove_file(pa).unwrap();
        assert_eq!(p2.lease("f").unwrap().0, a);
        assert_eq!(p.leases().len(), 3);
    }

    #[test]
    fn rejects_bad_pools() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(pool(t.path(), 1 << 20, 1000), Err(IdmapError::Count(1000))));
        assert!(matches!(pool(t.path(), u32::MAX - 10, 65536), Err(IdmapError::Overflow { .. })));
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nbig:x:200000:200000::/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
        )
        .unwrap();
        let err = pool(t.path(), 100_000, 4 * 65536).err().unwrap().to_string();
        assert!(err.contains("200000") && err.contains("big"), "{err}");
        assert!(pool(t.path(), 300_000, 65536).is_ok());
        // Root inside the pool is caught even when a higher id exists.
        let err = pool(t.path(), 0, 65536).err().unwrap().to_string();
        assert!(err.contains("root"), "{err}");
        // The last id of the pool counts too.
        let err = pool(t.path(), 200_000 - 65535, 65536).err().unwrap().to_string();
        assert!(err.contains("200000"), "{err}");
    }
}
