//! Figure 2: throughput. Fake.Echo streams N bytes up while the daemon
//! streams them back (N each way at once), through berth's proxy and over a
//! direct connection to the very same daemon's instance socket
//! (`<state>/instances/<id>/run/buildkitd.sock`, from Ping's `addrs`), so
//! daemon, cgroup limits and client are identical and only the path
//! differs. Transfers alternate between the paths; each figure is the
//! median of the repetitions. Each transfer runs on a fresh connection.
//! Then the same paths one way: Fake.Stream sends N bytes down only.

use crate::bench::env::{self, cpu_time, BenchAgent, Conn, CALL_TIMEOUT};
use crate::bench::report::{p50, summary, Goal, Row};
use crate::bench::{Ctx, Figure};
use crate::proto::fake::{EchoMessage, StreamRequest};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One Echo of `total` bytes in `chunk`-sized messages on a fresh
/// connection to `socket`; returns the elapsed seconds. Every 64th message
/// coming back is compared with what was sent, and the byte count must match.
pub(crate) async fn echo(socket: &Path, total: u64, chunk: &Arc<Vec<u8>>) -> Result<f64> {
    let conn = Conn::open(socket).await?;
    let size = chunk.len() as u64;
    let n = total.div_ceil(size);
    let c = chunk.clone();
    let len_of = move |i: u64| (total - i * size).min(size) as usize;
    let outbound = tokio_stream::iter((0..n).map(move |i| EchoMessage { data: c[..len_of(i)].to_vec() }));
    let t0 = Instant::now();
    let work = async {
        let mut s = conn
            .fake()
            .echo(outbound)
            .await
            .map_err(|e| anyhow!("Echo: {:?}: {}", e.code(), e.message()))?
            .into_inner();
        let mut got = 0u64;
        let mut k = 0u64;
        while let Some(m) = s.message().await.map_err(|e| anyhow!("Echo stream: {:?}: {}", e.code(), e.message()))? {
            if k.is_multiple_of(64) && m.data[..] != chunk[..m.data.len().min(chunk.len())] {
                bail!("Echo message {k} came back different");
            }
            got += m.data.len() as u64;
            k += 1;
        }
        if got != total {
            bail!("Echo returned {got} bytes of {total}");
        }
        Ok(())
    };
    within_budget("Echo", total, work).await?;
    let secs = t0.elapsed().as_secs_f64();
    conn.close();
    Ok(secs)
}

/// Runs a transfer of `total` bytes with a deadline of the call timeout
/// plus `total` at 20 MiB/s.
async fn within_budget(what: &str, total: u64, work: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let budget = CALL_TIMEOUT + Duration::from_secs_f64(total as f64 / (20 << 20) as f64);
    match tokio::time::timeout(budget, work).await {
        Ok(r) => r,
        Err(_) => bail!("{what} of {total} bytes did not finish within {budget:?}"),
    }
}

/// Fake.Stream of `total` bytes in `chunk`-byte messages on a fresh
/// connection (daemon to client only); returns the elapsed seconds. Every
/// 64th message is checked against the pattern at its offset.
async fn download(socket: &Path, total: u64, chunk: usize) -> Result<f64> {
    let conn = Conn::open(socket).await?;
    let t0 = Instant::now();
    let work = async {
        let req = StreamRequest { total_bytes: total, chunk_bytes: chunk as u32, delay_ms: 0 };
        let mut s =
            conn.fake().stream(req).await.map_err(|e| anyhow!("Stream: {:?}: {}", e.code(), e.message()))?.into_inner();
        let (mut got, mut k) = (0u64, 0u64);
        while let Some(m) = s.message().await.map_err(|e| anyhow!("Stream: {:?}: {}", e.code(), e.message()))? {
            if m.offset != got {
                bail!("Stream message {k} at offset {}, expected {got}", m.offset);
            }
            if k.is_multiple_of(64) && m.data != crate::pattern::chunk(m.offset, m.data.len()) {
                bail!("Stream message {k} came back different");
            }
            got += m.data.len() as u64;
            k += 1;
        }
        if got != total {
            bail!("Stream returned {got} bytes of {total}");
        }
        Ok(())
    };
    within_budget("Stream", total, work).await?;
    let secs = t0.elapsed().as_secs_f64();
    conn.close();
    Ok(secs)
}

pub(crate) fn daemon_pid(agent: &BenchAgent, id: &str) -> Option<u32> {
    std::fs::read_to_string(agent.state_dir.join("instances").join(id).join("daemon.pid"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A reference proxy (`berth-bench __proxy <mode>`) in front of `upstream`.
struct RefProxy {
    child: std::process::Child,
    socket: PathBuf,
    live: Arc<std::sync::atomic::AtomicU32>,
    _undo: env::UndoGuard,
}

impl RefProxy {
    async fn start(mode: &str, dir: &Path, upstream: &Path) -> Result<RefProxy> {
        let socket = dir.join(format!("proxy-{mode}.sock"));
        let exe = std::env::current_exe().context("current_exe")?;
        let child = std::process::Command::new(exe)
            .args(["__proxy", mode])
            .arg(&socket)
            .arg(upstream)
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("spawn reference proxy")?;
        let live = Arc::new(std::sync::atomic::AtomicU32::new(child.id()));
        let undo = env::register(env::Undo::Pid(live.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !crate::harness::socket_listening(&socket) {
            if Instant::now() >= deadline {
                bail!("reference proxy {mode} did not listen");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(RefProxy { child, socket, live, _undo: undo })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RefProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        self.live.store(0, std::sync::atomic::Ordering::SeqCst);
        let _ = self.child.wait();
    }
}

fn self_cpu() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

/// Connection latency through a running instance (no start): connect ->
/// first byte -> Ping reply, `n` times via each of `sockets`, taken in
/// turns (the order rotating), so machine noise falls on every path alike.
async fn reconnects(sockets: &[&Path], n: usize) -> Result<Vec<Vec<f64>>> {
    let mut v = vec![Vec::with_capacity(n); sockets.len()];
    for i in 0..n {
        for j in 0..sockets.len() {
            let k = (i + j) % sockets.len();
            let (s, _r, conn) = env::timed_ping(sockets[k], Instant::now()).await?;
            conn.close();
            v[k].push(s.first_byte_ms);
        }
    }
    Ok(v)
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let plan = &ctx.plan;
    // Client scope: every connection of the bench reaches the same instance.
    let agent = BenchAgent::start(
        &ctx.bins,
        "throughput",
        4,
        &["--max-builds", "2", "--idle-timeout", "120s", "--build-memory", "1Gi", "--stop-grace", "2s"],
    )
    .await?;
    // Held open for the whole figure, so the instance stays.
    let holder = Conn::open(&agent.socket).await?;
    let reply = holder.ping().await?;
    let id = env::instance_id_of(&reply).ok_or_else(|| anyhow!("no instance id in {}", reply.root))?;
    let direct: PathBuf = reply
        .addrs
        .first()
        .and_then(|a| a.strip_prefix("unix://"))
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("Ping reply has no unix addr: {:?}", reply.addrs))?;
    let expect = agent.state_dir.join("instances").join(&id).join("run").join("buildkitd.sock");
    if direct != expect {
        bail!("daemon serves on {}, expected {}", direct.display(), expect.display());
    }
    let dpid = daemon_pid(&agent, &id).context("daemon.pid")?;
    let (tmp, _g) = env::temp_dir("berth-bench-tp-")?;
    let copy = RefProxy::start("copy", &tmp, &direct).await?;
    let splice = RefProxy::start("splice", &tmp, &direct).await?;

    let mut pattern = vec![0u8; plan.tp_chunk];
    crate::pattern::fill(0, &mut pattern);
    let chunk = Arc::new(pattern);
    let paths: [(&str, PathBuf, Option<u32>); 4] = [
        ("direct", direct.clone(), None),
        ("berth", agent.socket.clone(), Some(agent.pid)),
        ("copy", copy.socket.clone(), Some(copy.pid())),
        ("splice", splice.socket.clone(), Some(splice.pid())),
    ];
    // Warm-up: a small transfer on each path (connection setup, page faults).
    let small = (plan.tp_bytes / 16).max(chunk.len() as u64);
    for (_, p, _) in &paths {
        echo(p, small, &chunk).await?;
    }

    let rss0 = env::rss(agent.pid).unwrap_or(0);
    let k = paths.len();
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); k];
    let mut proxy_cpu = vec![0.0; k];
    let mut daemon_cpu = vec![0.0; k];
    let mut client_cpu = vec![0.0; k];
    let mut proxy_sw = vec![0u64; k];
    let mut daemon_sw = vec![0u64; k];
    let sw = |p: Option<u32>| p.and_then(env::switches).unwrap_or(0);
    for rep in 0..plan.tp_reps {
        for j in 0..k {
            let i = (j + rep) % k;
            let (_, ref p, ppid) = paths[i];
            let p0 = ppid.and_then(cpu_time).unwrap_or_default();
            let d0 = cpu_time(dpid).unwrap_or_default();
            let c0 = self_cpu();
            let (ps0, ds0) = (sw(ppid), sw(Some(dpid)));
            secs[i].push(echo(p, plan.tp_bytes, &chunk).await?);
            proxy_sw[i] += sw(ppid).saturating_sub(ps0);
            daemon_sw[i] += sw(Some(dpid)).saturating_sub(ds0);
            proxy_cpu[i] += ppid.and_then(cpu_time).unwrap_or_default().saturating_sub(p0).as_secs_f64();
            daemon_cpu[i] += cpu_time(dpid).unwrap_or_default().saturating_sub(d0).as_secs_f64();
            client_cpu[i] += self_cpu() - c0;
        }
        progress!("throughput: {}/{}", rep + 1, plan.tp_reps);
    }
    // One way: the daemon streams, the client only reads.
    let mut down_secs: Vec<Vec<f64>> = vec![Vec::new(); k];
    let mut down_cpu = vec![0.0; k];
    for (_, p, _) in &paths {
        download(p, small, plan.tp_chunk).await?;
    }
    for rep in 0..plan.tp_reps {
        for j in 0..k {
            let i = (j + rep) % k;
            let (_, ref p, ppid) = paths[i];
            let p0 = ppid.and_then(cpu_time).unwrap_or_default();
            down_secs[i].push(download(p, plan.tp_bytes, plan.tp_chunk).await?);
            down_cpu[i] += ppid.and_then(cpu_time).unwrap_or_default().saturating_sub(p0).as_secs_f64();
        }
        progress!("throughput, one way: {}/{}", rep + 1, plan.tp_reps);
    }
    let rss1 = env::rss(agent.pid).unwrap_or(0);
    // Connection latency to the running instance: proxy path vs direct.
    let nrc = if plan.quick { 5 } else { 200 };
    let rc = reconnects(&paths.iter().map(|p| p.1.as_path()).collect::<Vec<_>>(), nrc).await?;
    let (rc_direct, rc_berth) = (&rc[0], &rc[1]);
    drop((copy, splice));
    holder.close();
    let leaks = agent.stop().await?;
    if !leaks.is_empty() {
        bail!("leaks after the throughput figure: {leaks:?}");
    }
    let mib = plan.tp_bytes as f64 / (1 << 20) as f64;
    let rate = |s: &[f64]| s.iter().map(|x| mib / x).collect::<Vec<_>>();
    let rates: Vec<Vec<f64>> = secs.iter().map(|s| rate(s)).collect();
    let down_rates: Vec<Vec<f64>> = down_secs.iter().map(|s| rate(s)).collect();
    let gib = plan.tp_bytes as f64 * plan.tp_reps as f64 / (1u64 << 30) as f64;
    let per_gib = |v: &[f64]| v.iter().map(|x| x / gib.max(1e-9)).collect::<Vec<_>>();
    let size = if plan.tp_bytes >= 1 << 30 {
        format!("{} GiB", plan.tp_bytes >> 30)
    } else {
        format!("{} MiB", plan.tp_bytes >> 20)
    };
    let base_is = "direct connection to the same daemon's socket";
    let d = p50(&rates[0]);
    let rows = vec![
        Row::new(
            "2 throughput",
            format!("Echo {size} each way, MiB/s (median of {})", plan.tp_reps),
            "MiB/s",
            p50(&rates[1]),
        )
        .baseline(d, base_is)
        .goal(Goal::RatioAtLeast(0.80), ">= 0.80x (node socket, issue 15)"),
        Row::new("2 throughput", "  same via reference copy proxy (agent's algorithm)", "MiB/s", p50(&rates[2]))
            .baseline(d, base_is),
        Row::new("2 throughput", "  same via reference splice proxy (zero-copy)", "MiB/s", p50(&rates[3]))
            .baseline(d, base_is),
        // The agent's CPU per GiB moved each way (utime+stime from
        // /proc/<agent>/stat), against the reference copy proxy's.
        Row::new("2 throughput", "  agent CPU per GiB each way", "CPU-s", p50(&per_gib(&proxy_cpu[1..2])))
            .baseline(p50(&per_gib(&proxy_cpu[2..3])), "reference copy proxy, same transfers"),
        Row::new("2 throughput", format!("Stream {size} down only, MiB/s"), "MiB/s", p50(&down_rates[1]))
            .baseline(p50(&down_rates[0]), base_is),
        Row::new("2 throughput", "  same via reference splice proxy", "MiB/s", p50(&down_rates[3]))
            .baseline(p50(&down_rates[0]), base_is),
        Row::new("2 throughput", "  agent CPU per GiB down only", "CPU-s", p50(&per_gib(&down_cpu[1..2])))
            .baseline(p50(&per_gib(&down_cpu[3..4])), "reference splice proxy, same transfers"),
        Row::new(
            "2 throughput",
            format!("reconnect to running instance, first byte p50 (n={nrc})"),
            "ms",
            p50(rc_berth),
        )
        .baseline(p50(rc_direct), base_is),
        Row::new("2 throughput", "  same via reference copy proxy", "ms", p50(&rc[2]))
            .baseline(p50(rc_direct), base_is),
        Row::new("2 throughput", "  same via reference splice proxy", "ms", p50(&rc[3]))
            .baseline(p50(rc_direct), base_is),
    ];
    let names: Vec<&str> = paths.iter().map(|p| p.0).collect();
    let details = json!({
        "bytes_each_way": plan.tp_bytes,
        "message_bytes": plan.tp_chunk,
        "reps": plan.tp_reps,
        "paths": names,
        "seconds": secs,
        "mib_s": rates,
        // CPU seconds per GiB moved each way (both directions together).
        "proxy_cpu_s_per_gib": per_gib(&proxy_cpu),
        "daemon_cpu_s_per_gib": per_gib(&daemon_cpu),
        "client_cpu_s_per_gib": per_gib(&client_cpu),
        // Context switches (all threads) per GiB each way: the relays' and
        // the daemon's wake-ups.
        "proxy_switches_per_gib": proxy_sw.iter().map(|&x| x as f64 / gib.max(1e-9)).collect::<Vec<_>>(),
        "daemon_switches_per_gib": daemon_sw.iter().map(|&x| x as f64 / gib.max(1e-9)).collect::<Vec<_>>(),
        "down_only_seconds": down_secs,
        "down_only_mib_s": down_rates,
        "down_only_proxy_cpu_s_per_gib": per_gib(&down_cpu),
        "agent_rss_mib_before_transfers": rss0 as f64 / (1 << 20) as f64,
        "agent_rss_mib_after_transfers": rss1 as f64 / (1 << 20) as f64,
        "reconnect_first_byte_ms_berth": summary(rc_berth),
        "reconnect_first_byte_ms_direct": summary(rc_direct),
        "reconnect_first_byte_ms_copy_proxy": summary(&rc[2]),
        "reconnect_first_byte_ms_splice_proxy": summary(&rc[3]),
    });
    Ok(Figure { rows, details })
}
