//! Figure 7: flood. One client (the bench, uid 0) opens 10000 connections
//! to the node socket and leaves them idle; then a second client (another
//! uid, the `fakeclient` binary) pings. Measured: the agent's VmRSS and
//! descriptor count with the flood held (against the idle agent and its
//! RLIMIT_NOFILE), the second client's ping time (against the same ping
//! from a third client before the flood: a cold start each), and what a
//! sample of the flood's excess connections get when they call (the
//! per-client cap's RESOURCE_EXHAUSTED).

use crate::bench::env::{rss, BenchAgent, CALL_TIMEOUT};
use crate::bench::report::{Goal, Row};
use crate::bench::{Ctx, Figure};
use crate::proto::fake::fake_client::FakeClient;
use crate::proto::fake::PingRequest;
use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

const MIB: f64 = (1 << 20) as f64;
/// The agent's default `--max-client-connections`.
const CAP: usize = 64;
/// Excess connections asked for their answer.
const SAMPLE: usize = 20;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn nofile_soft(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().filter_map(|w| w.parse().ok()).next()
}

/// A fresh client's ping as uid `uid`, timed from spawn to exit.
async fn ping_as(socket: &Path, uid: u32) -> Result<f64> {
    let exe = crate::harness::bin_path("fakeclient");
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("--socket").arg(socket).args(["--timeout", "30", "ping"]).uid(uid).gid(uid);
    let t0 = Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output()).await?.context("fakeclient")?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!("uid {uid}'s ping failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(ms)
}

/// One gRPC call on an already open connection.
async fn call_on(stream: UnixStream) -> Result<tonic::Status> {
    let slot = Arc::new(Mutex::new(Some(stream)));
    let ch = Endpoint::from_static("http://flood.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let s = slot.lock().unwrap().take();
            async move { s.map(TokioIo::new).ok_or_else(|| std::io::Error::other("used")) }
        }))
        .await?;
    match tokio::time::timeout(CALL_TIMEOUT, FakeClient::new(ch).ping(PingRequest {})).await {
        Ok(Ok(_)) => bail!("an excess connection was served"),
        Ok(Err(s)) => Ok(s),
        Err(_) => bail!("no answer within {CALL_TIMEOUT:?}"),
    }
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let n = if ctx.plan.quick { 300 } else { 10_000 };
    // The bench holds the flood's descriptors too.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    if (hard as usize) < n + 256 {
        bail!("RLIMIT_NOFILE hard limit {hard} is too low for {n} connections");
    }
    let agent = BenchAgent::start(
        &ctx.bins,
        "flood",
        4,
        &["--max-builds", "3", "--socket-mode", "0666", "--idle-timeout", "10s"],
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss(agent.pid).unwrap_or(0) as f64;
    let idle_fds = fds(agent.pid);
    let limit = nofile_soft(agent.pid).unwrap_or(0);
    // Baseline: a fresh client's ping (a cold start) before the flood.
    let before_ms = ping_as(&agent.socket, 64_101).await?;

    let t = Instant::now();
    let mut flood = Vec::with_capacity(n);
    let mut backlog_full = 0usize;
    while flood.len() < n {
        match UnixStream::connect(&agent.socket).await {
            Ok(s) => flood.push(s),
            // The listen backlog is full (EAGAIN on a unix socket): the
            // agent has not accepted yet; a flooding client just retries.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && backlog_full < 100 * n => {
                backlog_full += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) => return Err(e).context("flood connect"),
        }
    }
    let open_s = t.elapsed().as_secs_f64();
    // The newest excess connections (refusals linger 5 s): the cap's error?
    let mut capped = 0;
    let mut answers = Vec::new();
    for s in flood.split_off(n - SAMPLE) {
        match call_on(s).await {
            Ok(st) => {
                let ok =
                    st.code() == tonic::Code::ResourceExhausted && st.message().contains("--max-client-connections");
                capped += ok as usize;
                if answers.len() < 2 {
                    answers.push(format!("{:?}: {}", st.code(), st.message()));
                }
            }
            Err(e) => answers.push(format!("{e:#}")),
        }
    }
    // Let the agent take in the rest of the backlog (accept, identify, refuse).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flood_rss = rss(agent.pid).unwrap_or(0) as f64;
    let flood_fds = fds(agent.pid);
    let during_ms = ping_as(&agent.socket, 64_102).await?;
    let peak_rss = rss(agent.pid).unwrap_or(0) as f64;

    drop(flood);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after_rss = rss(agent.pid).unwrap_or(0) as f64;
    let after_fds = fds(agent.pid);
    let leaks = agent.stop().await?;
    if !leaks.is_empty() {
        bail!("left behind: {leaks:?}");
    }
    let rows = vec![
        Row::new(
            "9 flood",
            format!("agent VmRSS with {n} idle conns of one client"),
            "MiB",
            flood_rss.max(peak_rss) / MIB,
        )
        .baseline(idle_rss / MIB, "idle agent")
        .goal(Goal::Below(64.0), "< 64 MiB"),
        Row::new("9 flood", "agent descriptors during the flood", "fds", flood_fds as f64)
            .baseline(limit as f64, "its RLIMIT_NOFILE (soft, raised to hard)")
            .goal(Goal::Below(limit as f64), "< limit"),
        Row::new("9 flood", "2nd client's ping (cold start) during the flood", "ms", during_ms)
            .baseline(before_ms, "same ping before the flood")
            .goal(Goal::OverheadAtMost(250.0), "<= +250 ms"),
        Row::new(
            "9 flood",
            format!("excess conns answered with the cap (of {SAMPLE} sampled)"),
            "conns",
            capped as f64,
        )
        .baseline(SAMPLE as f64, "sampled")
        .goal(Goal::RatioAtLeast(1.0), "all"),
    ];
    Ok(Figure {
        rows,
        details: json!({
            "connections": n,
            "cap": CAP,
            "open_seconds": open_s,
            "backlog_full_retries": backlog_full,
            "idle_rss_mib": idle_rss / MIB,
            "flood_rss_mib": flood_rss / MIB,
            "peak_rss_mib": peak_rss / MIB,
            "after_close_rss_mib": after_rss / MIB,
            "idle_fds": idle_fds,
            "flood_fds": flood_fds,
            "after_close_fds": after_fds,
            "nofile_soft": limit,
            "ping_before_ms": before_ms,
            "ping_during_ms": during_ms,
            "sample_answers": answers,
        }),
    })
}
