//! `check` for `--build-network isolated`: veth support, nftables, IP
//! forwarding, a build subnet clear of the node's routes, and resolvers a
//! build can reach. Each failing line says how to fix it.
#![forbid(unsafe_code)]

use super::{fail, ok, warn, Item};
use crate::config::{BuildNetwork, NetArgs};
use crate::network::dns::Resolvers;
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

const FIX_MODE: &str = "or run builds with --build-network host (no isolation) or none (offline)";

pub fn checks(net: &NetArgs, proc_root: &Path) -> Vec<Item> {
    if net.build_network != BuildNetwork::Isolated {
        let mode = format!("{:?}", net.build_network).to_lowercase();
        return vec![ok("build network", format!("--build-network {mode}: no veth, firewall or subnet needed"))];
    }
    vec![veth(), nft(), forwarding(proc_root), subnet(net.build_subnet, proc_root), resolvers(&net.build_resolv_conf)]
}

/// Creates and deletes a veth pair: the one kernel feature isolated needs
/// beyond network namespaces.
fn veth() -> Item {
    const N: &str = "veth";
    // Unique per probe: two checks in one process (the unit tests run in
    // parallel threads) must not collide on the name (EEXIST).
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
    let name = format!("bkchk{}x{n}", std::process::id() % 100_000);
    let res =
        tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(|e| e.to_string()).and_then(|rt| {
            rt.block_on(async {
                let h = berth_shim::net::connect().map_err(|e| e.to_string())?;
                let msg = rtnetlink::LinkVeth::new(&name, &format!("{name}p")).build();
                h.link().add(msg).execute().await.map_err(|e| e.to_string())?;
                berth_shim::net::delete_link(&h, &name).await.map_err(|e| e.to_string())?;
                Ok::<(), String>(())
            })
        });
    match res {
        Ok(()) => ok(N, "a veth pair can be created"),
        Err(e) => fail(
            N,
            format!("cannot create a veth pair: {e}"),
            format!("run as root with CONFIG_VETH (modprobe veth), {FIX_MODE}"),
        ),
    }
}

fn nft() -> Item {
    const N: &str = "nftables";
    match Command::new("nft").args(["list", "tables"]).output() {
        Ok(o) if o.status.success() => {
            let v = Command::new("nft")
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
            ok(N, format!("{} works", v.unwrap_or_else(|_| "nft".into())))
        }
        Ok(o) => fail(
            N,
            format!("nft list tables failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
            format!("load nf_tables (modprobe nf_tables) and run as root, {FIX_MODE}"),
        ),
        Err(e) => fail(
            N,
            format!("nft not found: {e}"),
            format!("apt-get install nftables (the agent image ships it), {FIX_MODE}"),
        ),
    }
}

fn forwarding(proc_root: &Path) -> Item {
    const N: &str = "ip forwarding";
    let p = proc_root.join("sys/net/ipv4/ip_forward");
    match std::fs::read_to_string(&p).map(|s| s.trim().to_string()) {
        Ok(v) if v == "1" => ok(N, "net.ipv4.ip_forward=1"),
        Ok(_) => warn(
            N,
            "net.ipv4.ip_forward=0: the agent turns it on at start (as Docker does) and logs it",
            "to keep it on across reboots: echo net.ipv4.ip_forward=1 > /etc/sysctl.d/90-berth.conf",
        ),
        Err(e) => fail(N, format!("{}: {e}", p.display()), "mount procfs with /proc/sys/net"),
    }
}

/// Routes of the node, `(interface, network)`, from `<proc>/net/route`
/// (hex, host byte order: little-endian on every node berth runs on).
pub fn routes(proc_root: &Path) -> Vec<(String, Ipv4Net)> {
    let text = std::fs::read_to_string(proc_root.join("net/route")).unwrap_or_default();
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(|v| Ipv4Addr::from(v.swap_bytes()));
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dst, mask) = (hex(f.get(1)?)?, hex(f.get(7)?)?);
            let net = Ipv4Net::with_netmask(dst, mask).ok()?;
            Some((f[0].to_string(), net))
        })
        .collect()
}

fn subnet(pool: Ipv4Net, proc_root: &Path) -> Item {
    const N: &str = "build subnet";
    let clash: Vec<String> = routes(proc_root)
        .into_iter()
        .filter(|(dev, net)| {
            net.prefix_len() > 0
                && !dev.starts_with("bk")
                && (net.contains(&pool.network()) || pool.contains(&net.network()))
        })
        .map(|(dev, net)| format!("{net} dev {dev}"))
        .collect();
    if clash.is_empty() {
        ok(
            N,
            format!("{pool} ({} builds) collides with no route of the node", 1u32 << (30 - pool.prefix_len().min(30))),
        )
    } else {
        fail(
            N,
            format!("{pool} overlaps routes of the node: {}", clash.join(", ")),
            "pick a free private range: --build-subnet 10.213.0.0/16 (any /24 or larger)",
        )
    }
}

fn resolvers(conf: &Path) -> Item {
    const N: &str = "build dns";
    let r = Resolvers::read(conf);
    if r.nameservers.is_empty() {
        warn(
            N,
            format!("{}: no resolver a build can reach (dropped: {})", conf.display(), r.dropped.join("; ")),
            "point --build-resolv-conf at the upstream resolv.conf (e.g. /run/systemd/resolve/resolv.conf)",
        )
    } else {
        ok(N, format!("builds resolve through {:?} (port 53 only)", r.nameservers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_collisions_come_from_proc_net_route() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("net")).unwrap();
        // default via eth0; 10.213.5.0/24 on cni0 (inside the pool); 192.168.1.0/24 on eth0.
        std::fs::write(
            t.path().join("net/route"),
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             cni0\t0005D50A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
             eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n",
        )
        .unwrap();
        let r = routes(t.path());
        assert_eq!(r.len(), 3);
        assert_eq!(r[1], ("cni0".to_string(), "10.213.5.0/24".parse().unwrap()));
        let bad = subnet("10.213.0.0/16".parse().unwrap(), t.path());
        assert!(bad.detail.contains("10.213.5.0/24 dev cni0") && bad.fix.is_some(), "{bad}");
        assert!(subnet("10.214.0.0/16".parse().unwrap(), t.path()).fix.is_none());
    }
}
