//! Figure 7: the isolated build network. Start overhead of
//! `--build-network isolated` (netns + veth + addresses + route, made and
//! removed per instance) against `host` in the same run, samples
//! alternating between two agents; and egress throughput: a RUN-step-like
//! download by the instance from a server in a network namespace the bench
//! makes (joined to this one by a veth, a /30 route only), through the NAT
//! against the same download in host mode.

use crate::bench::env::BenchAgent;
use crate::bench::report::{p50, p99, Goal, Row};
use crate::bench::start::berth_sample;
use crate::bench::{Ctx, Figure};
use crate::netfix::{sh, World};
use crate::proto::fake::ConnectRequest;
use anyhow::{bail, Result};
use serde_json::json;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;

/// The download server's namespace and link: `198.19.<n>.0/30`, .1 here, .2 there.
struct Remote {
    ns: String,
    link: String,
    addr: Ipv4Addr,
}

impl Remote {
    fn new(bytes: u64) -> Remote {
        let n = std::process::id() % 250;
        let (ns, link) = (format!("bbw{}", std::process::id()), format!("bbw{n}h"));
        sh(&["ip", "netns", "add", &ns]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&["ip", "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        sh(&["ip", "addr", "add", &format!("198.19.{n}.1/30"), "dev", &link]);
        sh(&["ip", "-n", &ns, "addr", "add", &format!("198.19.{n}.2/30"), "dev", "eth0"]);
        sh(&["ip", "link", "set", &link, "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "route", "add", "default", "via", &format!("198.19.{n}.1")]);
        let addr = Ipv4Addr::new(198, 19, n as u8, 2);
        let r = sh(&["ip", "route", "get", &addr.to_string()]);
        assert!(r.contains(&format!("dev {link}")), "route to the bench's server leaves its link: {r}");
        let l = World::in_ns(&ns, move || TcpListener::bind((addr, 8080)).expect("bind bench server"));
        std::thread::spawn(move || {
            let chunk = vec![0x5au8; 1 << 20];
            for c in l.incoming().flatten() {
                let chunk = chunk.clone();
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut left = bytes;
                    while left > 0 {
                        let k = left.min(chunk.len() as u64) as usize;
                        if c.write_all(&chunk[..k]).is_err() {
                            return;
                        }
                        left -= k as u64;
                    }
                });
            }
        });
        Remote { ns, link, addr }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.link]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// MB/s of one download of `bytes` through `agent`'s instance.
async fn download(agent: &BenchAgent, addr: Ipv4Addr, bytes: u64) -> Result<f64> {
    let mut c = crate::grpc::fake_client(&agent.socket).await;
    let req = ConnectRequest {
        address: format!("{addr}:8080"),
        send: vec![],
        timeout_ms: 5000,
        discard: true,
        source: String::new(),
    };
    let r = c.dial(req).await?.into_inner();
    if r.result != "ok" || r.received_bytes != bytes {
        bail!("download through the instance: {r:?}");
    }
    Ok(bytes as f64 / 1e6 / (r.transfer_ms.max(1) as f64 / 1e3))
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let plan = &ctx.plan;
    let flags = ["--scope", "connection", "--max-builds", "4", "--idle-timeout", "30s", "--stop-grace", "2s"];
    let iso = BenchAgent::start(&ctx.bins, "net-iso", 8, &flags).await?;
    let mut host_flags = flags.to_vec();
    host_flags.extend(["--build-network", "host"]);
    let host = BenchAgent::start(&ctx.bins, "net-host", 8, &host_flags).await?;
    let (mut si, mut sh_) = (Vec::new(), Vec::new());
    for i in 0..plan.warmup + plan.start_samples {
        let keep = i >= plan.warmup;
        for which in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            let s = berth_sample(if which == 0 { &iso } else { &host }).await?;
            if keep {
                if which == 0 {
                    si.push(s.first_byte_ms)
                } else {
                    sh_.push(s.first_byte_ms)
                }
            }
        }
    }
    let bytes = if plan.quick { 64 << 20 } else { 1 << 30 };
    let remote = Remote::new(bytes);
    let (mut ti, mut th) = (Vec::new(), Vec::new());
    for _ in 0..plan.tp_reps.max(1) {
        ti.push(download(&iso, remote.addr, bytes).await?);
        th.push(download(&host, remote.addr, bytes).await?);
    }
    drop(remote);
    let (scrape_nft, scrape_rest) = scrape_cost(&iso._net.table, if plan.quick { 20 } else { 500 })?;
    let (elem_nl, elem_exec) = element_cost(&iso._net.table, if plan.quick { 5 } else { 40 })?;
    let leaks = [iso.stop().await?, host.stop().await?].concat();
    if !leaks.is_empty() {
        bail!("leaks after the network figure: {leaks:?}");
    }
    let base = "--build-network host, same run, alternating";
    let rows = vec![
        Row::new("8 network", format!("isolated connect->first byte p50 (n={})", si.len()), "ms", p50(&si))
            .baseline(p50(&sh_), base)
            .goal(Goal::OverheadAtMost(5.0), "added start cost <= 5 ms"),
        Row::new("8 network", "isolated connect->first byte p99", "ms", p99(&si)).baseline(p99(&sh_), base),
        Row::new(
            "8 network",
            format!("download through NAT, {} MiB (best of {})", bytes >> 20, ti.len()),
            "MB/s",
            ti.iter().cloned().fold(0.0, f64::max),
        )
        .baseline(th.iter().cloned().fold(0.0, f64::max), "host mode, same server"),
        Row::new(
            "8 network",
            format!("/metrics: firewall counters read p50 (n={})", scrape_nft.len()),
            "us",
            p50(&scrape_nft),
        )
        .baseline(p50(&scrape_rest), "encoding the rest of /metrics, same run"),
        Row::new(
            "8 network",
            format!("builds set element add (start path), netlink p50 (n={})", elem_nl.len()),
            "us",
            p50(&elem_nl),
        )
        .baseline(p50(&elem_exec), "the same add through an `nft` exec, same run"),
    ];
    Ok(Figure {
        rows,
        details: json!({"isolated_ms": si, "host_ms": sh_, "nat_mbps": ti, "host_mbps": th, "scrape_nft_us": scrape_nft, "scrape_rest_us": scrape_rest, "element_netlink_us": elem_nl, "element_nft_exec_us": elem_exec}),
    })
}

/// What the isolated network adds to a /metrics scrape (one netlink dump of
/// the table's named counters, as `network::metrics` does at each scrape),
/// against encoding the rest of the agent's metrics: microseconds, `n` each,
/// interleaved.
fn scrape_cost(table: &str, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let m = berth_agent::metrics::Metrics::new();
    let (mut nft, mut rest) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = std::time::Instant::now();
        let c = berth_shim::net::nft::counters(table)?;
        nft.push(t.elapsed().as_secs_f64() * 1e6);
        if c.len() < 6 {
            bail!("table {table} has {} named counters, expected 6", c.len());
        }
        let t = std::time::Instant::now();
        std::hint::black_box(m.encode());
        rest.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((nft, rest))
}

/// What the shim's per-instance element costs on the start path (the add,
/// with the veth) over netlink, against the same add through an `nft`
/// exec: microseconds, `n` each, interleaved, on an address outside every
/// lease. Each add is undone untimed (the delete, at the wipe, waits out an
/// RCU grace period when its socket closes: not on the start path).
fn element_cost(table: &str, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    use berth_shim::net::nft;
    let (addr, name) = (Ipv4Addr::new(192, 0, 2, 2), "bkbenchelem");
    let (mut nl, mut exec) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = std::time::Instant::now();
        nft::add_build(table, addr, name)?;
        nl.push(t.elapsed().as_secs_f64() * 1e6);
        nft::remove_build(table, addr, name)?;
        let elem = format!("{{ {addr} . \"{name}\" }}");
        let t = std::time::Instant::now();
        sh(&["nft", "add", "element", "inet", table, "builds", &elem]);
        exec.push(t.elapsed().as_secs_f64() * 1e6);
        nft::remove_build(table, addr, name)?;
    }
    Ok((nl, exec))
}
