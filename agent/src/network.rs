//! The isolated build network, agent side: at start, forwarding and the
//! firewall (one nftables table, set once); per instance, a /30 of the build
//! subnet leased on disk and the instance's resolv.conf and hosts; at the
//! sweep, leases and host-side veths a dead agent left. The shim creates and
//! removes the veth itself (see `berth_shim::net`), so `berth-shim delete`
//! undoes an instance's network from its spec alone.
//!
//! Per-instance firewall state is one element of the `builds` set (`inner
//! address . host veth`), added and removed by the shim over netlink with
//! the veth (see `berth_shim::net::nft`): the rules are never rewritten and
//! no `nft` runs at an instance's start (6 ms per call on the 2-core test
//! machine, more than the whole start budget). The rules match the
//! host-side veths by name prefix (`bk<tag>`, the tag derived from the
//! table name); the sweep removes the elements a crash left.
#![forbid(unsafe_code)]

pub mod dns;
pub mod firewall;
pub mod metrics;
pub mod pool;

use crate::config::{BuildNetwork, NetArgs};
use berth_shim::spec::{NetSpec, Spec, HOSTS_FILE, RESOLV_FILE};
use std::fs;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("nftables: {0}")]
    Firewall(#[from] firewall::FirewallError),
    #[error("build subnet: {0}")]
    Pool(#[from] pool::PoolError),
    #[error("{path}: cannot enable IP forwarding ({source}); run `sysctl -w net.ipv4.ip_forward=1` on the node, or use --build-network host|none")]
    Forwarding { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Link(#[from] berth_shim::net::NetError),
}

impl NetworkError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            NetworkError::Firewall(_) => "firewall",
            NetworkError::Pool(pool::PoolError::Exhausted(_)) => "subnet_exhausted",
            NetworkError::Pool(_) => "subnet",
            NetworkError::Forwarding { .. } => "forwarding",
            NetworkError::Io { .. } => "io",
            NetworkError::Link(_) => "netlink",
        }
    }
}

/// The isolated network of a running agent.
pub struct Network {
    pub pool: pool::SubnetPool,
    /// Prefix of this table's host-side veths: `bk` + 4 hex digits.
    pub prefix: String,
    /// The instance resolv.conf, rendered once at start.
    pub resolv: String,
    /// berth's nftables table (`--build-nft-table`).
    pub table: String,
}

/// Four hex digits naming the table in interface names (FNV-1a: stable
/// across builds and releases, unlike std's hasher).
pub fn tag(table: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in table.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    format!("{:04x}", (h ^ (h >> 16)) & 0xffff)
}

/// The host-side veth of instance `id`: 15 bytes, the kernel's limit.
pub fn host_if(prefix: &str, id: &str) -> String {
    let id: String = id.chars().filter(|c| c.is_ascii_alphanumeric()).take(15 - prefix.len()).collect();
    format!("{prefix}{id}")
}

impl Network {
    /// Sets up the agent's side when the build network is isolated: IP
    /// forwarding on, the firewall table (re)installed, the resolvers read.
    pub async fn start(net: &NetArgs, state_dir: &Path, proc_root: &Path) -> Result<Option<Network>, NetworkError> {
        if net.build_network != BuildNetwork::Isolated {
            return Ok(None);
        }
        let forwarding = proc_root.join("sys/net/ipv4/ip_forward");
        let on = fs::read_to_string(&forwarding)
            .map_err(|source| NetworkError::Forwarding { path: forwarding.clone(), source })?;
        if on.trim() != "1" {
            // As Docker's daemon does: NAT egress needs it, and the firewall
            // below forwards nothing but the builds' own traffic.
            fs::write(&forwarding, "1")
                .map_err(|source| NetworkError::Forwarding { path: forwarding.clone(), source })?;
            warn!(path = %forwarding.display(), "enabled IP forwarding (net.ipv4.ip_forward=1) for isolated build networks");
        }
        let resolvers = dns::Resolvers::read(&net.build_resolv_conf);
        if resolvers.nameservers.is_empty() {
            warn!(resolv_conf = %net.build_resolv_conf.display(), dropped = ?resolvers.dropped, "no resolver builds can reach (loopback ones are dropped): builds cannot resolve names; point --build-resolv-conf at the node's upstream resolv.conf");
        }
        let prefix = format!("bk{}", tag(&net.build_nft_table));
        let rules = firewall::Rules {
            table: net.build_nft_table.clone(),
            prefix: prefix.clone(),
            subnet: net.build_subnet,
            deny: net.build_egress_deny.clone(),
            allow: net.build_egress_allow.clone(),
            dns: resolvers.nameservers.clone(),
        };
        firewall::install(&rules).await?;
        let pool = pool::SubnetPool::new(net.build_subnet, state_dir.join("net-leases"))?;
        info!(table = %net.build_nft_table, veth_prefix = %prefix, subnet = %net.build_subnet, instances = pool.capacity(), resolvers = ?resolvers.nameservers, deny = ?net.build_egress_deny, allow = ?net.build_egress_allow, "isolated build network ready");
        Ok(Some(Network { pool, prefix, resolv: resolvers.render(), table: net.build_nft_table.clone() }))
    }

    /// Leases a subnet for instance `id` of agent `owner`.
    pub fn lease(&self, id: &str, owner: &str) -> Result<NetSpec, NetworkError> {
        let l = self.pool.lease(&format!("{id} {owner}"))?;
        Ok(NetSpec {
            host_if: host_if(&self.prefix, id),
            host_addr: l.host,
            inner_addr: l.inner,
            prefix_len: 30,
            lease: l.path,
            nft_table: self.table.clone(),
        })
    }

    /// Writes the instance's resolv.conf and hosts into its dir (root's,
    /// world-readable: the daemon's root reads them through its bind mounts).
    pub fn write_files(&self, spec: &Spec) -> Result<(), (PathBuf, std::io::Error)> {
        use std::os::unix::fs::PermissionsExt;
        let Some(net) = &spec.network else { return Ok(()) };
        let hosts = dns::hosts(&spec.hostname, net.inner_addr);
        for (name, text) in [(RESOLV_FILE, self.resolv.as_str()), (HOSTS_FILE, hosts.as_str())] {
            let p = spec.dir.join(name);
            fs::write(&p, text)
                .and_then(|()| fs::set_permissions(&p, fs::Permissions::from_mode(0o644)))
                .map_err(|e| (p.clone(), e))?;
        }
        Ok(())
    }

    /// Removes subnet leases whose agent is dead and whose instance dir is
    /// gone (after `berth-shim delete` ran on the dirs), with their veths;
    /// then any veth of this table's prefix that no lease names, and any
    /// element of the `builds` set whose veth no kept lease names. Returns
    /// how many leases and links it removed.
    pub async fn sweep(&self, instances: &Path, alive: impl Fn(&str) -> bool) -> (usize, usize) {
        let handle = match berth_shim::net::connect() {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "network sweep: no netlink socket");
                return (0, 0);
            }
        };
        let (mut leases, mut links) = (0, 0);
        let mut kept = Vec::new();
        for (path, content) in self.pool.leases() {
            let mut w = content.split_whitespace();
            let (id, owner) = (w.next().unwrap_or("").to_string(), w.next().unwrap_or(""));
            let name = host_if(&self.prefix, &id);
            if alive(owner) || (!id.is_empty() && instances.join(&id).exists()) {
                kept.push(name);
                continue;
            }
            match berth_shim::net::delete_link(&handle, &name).await {
                Ok(gone) => links += gone as usize,
                Err(e) => {
                    warn!(link = %name, error = %e, "cannot remove a stale veth; its subnet stays leased");
                    continue;
                }
            }
            match fs::remove_file(&path) {
                Ok(()) => leases += 1,
                Err(e) => warn!(lease = %path.display(), error = %e, "cannot remove stale subnet lease"),
            }
        }
        match berth_shim::net::links_with_prefix(&handle, &self.prefix).await {
            Ok(names) => {
                for name in names.into_iter().filter(|n| !kept.contains(n)) {
                    match berth_shim::net::delete_link(&handle, &name).await {
                        Ok(gone) => links += gone as usize,
                        Err(e) => warn!(link = %name, error = %e, "cannot remove a stale veth"),
                    }
                }
            }
            Err(e) => warn!(error = %e, "network sweep: cannot list links"),
        }
        self.sweep_elements(&kept);
        (leases, links)
    }
}

impl Network {
    /// Removes the elements of the `builds` set whose veth is of this
    /// agent's prefix and not in `kept` (a lease of a live instance).
    fn sweep_elements(&self, kept: &[String]) {
        use berth_shim::net::nft;
        let elements = match nft::builds(&self.table) {
            Ok(e) => e,
            Err(e) => return warn!(error = %e, "network sweep: cannot list the builds set"),
        };
        for (addr, name) in elements.into_iter().filter(|(_, n)| n.starts_with(&self.prefix) && !kept.contains(n)) {
            match nft::remove_build(&self.table, addr, &name) {
                Ok(_) => info!(element = %format!("{addr} . {name}"), "removed a stale nftables element"),
                Err(e) => warn!(error = %e, "cannot remove a stale nftables element"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit_and_differ_by_table() {
        let p = format!("bk{}", tag("berth"));
        assert_eq!(p.len(), 6);
        let n = host_if(&p, "0123456789ab");
        assert_eq!(n, format!("{p}012345678"));
        assert_eq!(n.len(), 15);
        assert_ne!(tag("berth"), tag("berth_t1"));
        assert_eq!(tag("berth"), tag("berth"));
    }
}
