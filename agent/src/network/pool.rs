//! The build subnet: one /30 per instance (network, agent side, daemon
//! side, broadcast), leased on disk like the id ranges (see `idmap`): a file
//! `<state>/net-leases/<network address>` created with O_EXCL and holding
//! `<instance id> <owner agent id>`. Named by address, not by slot, so two
//! agents on one state dir with different `--build-subnet`s never collide.
//! The shim removes the lease once the veth is gone; the sweep removes those
//! of dead agents.
#![forbid(unsafe_code)]

use ipnet::Ipv4Net;
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("all {0} /30 subnets of --build-subnet are leased; use a larger --build-subnet")]
    Exhausted(u32),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub struct SubnetPool {
    net: Ipv4Net,
    dir: PathBuf,
    /// Where the next search starts: a released subnet is not reused at once.
    cursor: AtomicU32,
}

/// One leased /30.
#[derive(Debug, Clone)]
pub struct Lease {
    pub host: Ipv4Addr,
    pub inner: Ipv4Addr,
    pub path: PathBuf,
}

impl SubnetPool {
    pub fn new(net: Ipv4Net, dir: PathBuf) -> Result<SubnetPool, PoolError> {
        fs::create_dir_all(&dir).map_err(|source| PoolError::Io { path: dir.clone(), source })?;
        Ok(SubnetPool { net, dir, cursor: AtomicU32::new(0) })
    }

    /// How many /30s the subnet holds.
    pub fn capacity(&self) -> u32 {
        1u32 << (30 - self.net.prefix_len().min(30))
    }

    pub fn lease(&self, owner: &str) -> Result<Lease, PoolError> {
        let n = self.capacity();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let base = u32::from(self.net.network());
        for i in 0..n {
            let slot = (start + i) % n;
            let net = base + slot * 4;
            let path = self.dir.join(Ipv4Addr::from(net).to_string());
            match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(owner.as_bytes()).map_err(|source| PoolError::Io { path: path.clone(), source })?;
                    self.cursor.store(slot + 1, Ordering::Relaxed);
                    return Ok(Lease { host: Ipv4Addr::from(net + 1), inner: Ipv4Addr::from(net + 2), path });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(PoolError::Io { path, source }),
            }
        }
        Err(PoolError::Exhausted(n))
    }

    /// `(path, content)` of every lease on disk, for the sweep.
    pub fn leases(&self) -> Vec<(PathBuf, String)> {
        let Ok(rd) = fs::read_dir(&self.dir) else { return Vec::new() };
        rd.flatten().map(|e| (e.path(), fs::read_to_string(e.path()).unwrap_or_default())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_disjoint_30s_inside_the_subnet_and_bounded() {
        let t = tempfile::tempdir().unwrap();
        let net: Ipv4Net = "10.9.8.0/28".parse().unwrap();
        let p = SubnetPool::new(net, t.path().join("l")).unwrap();
        assert_eq!(p.capacity(), 4);
        let all: Vec<Lease> = (0..4).map(|i| p.lease(&format!("i{i} o")).unwrap()).collect();
        let mut hosts: Vec<u32> = all.iter().map(|l| u32::from(l.host)).collect();
        hosts.sort();
        assert_eq!(hosts, vec![0x0a09_0801, 0x0a09_0805, 0x0a09_0809, 0x0a09_080d]);
        for l in &all {
            assert!(net.contains(&l.host) && net.contains(&l.inner));
            assert_eq!(u32::from(l.inner), u32::from(l.host) + 1);
        }
        assert!(matches!(p.lease("x o"), Err(PoolError::Exhausted(4))));
        // A second agent on the same dir sees them; a released one comes back.
        let p2 = SubnetPool::new(net, t.path().join("l")).unwrap();
        fs::remove_file(&all[2].path).unwrap();
        assert_eq!(p2.lease("y o").unwrap().host, all[2].host);
        assert_eq!(p.leases().len(), 4);
    }
}
