//! Figure 10: the cost of counting a pod socket's connections (issue 15).
//! On the fd path the daemon accepts the pod's connections, and idle
//! reaping asks the kernel how many there are: one sock_diag dump of the
//! unix sockets (`berth_agent::handoff::diag::count`), every 250 ms per
//! fd-passed instance. Measured with 1, 64 and 1024 connections open on one
//! listener (accepted, as the daemon holds them). The same-run baseline is
//! the alternative the issue names: one read of the instance cgroup's
//! counters (memory usage and the pids count), which cost about the same
//! but cannot tell a connection open from none.

use crate::bench::report::Row;
use crate::bench::{Ctx, Figure};
use anyhow::{Context, Result};
use berth_agent::handoff::diag::{count, SocketFile};
use serde_json::json;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

/// Median of `iters` timings of `f`, in microseconds.
fn median_us(iters: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// What the cgroup alternative reads per sample: the agent's own cgroup's
/// counters (an instance's look the same).
fn cgroup_files() -> Vec<std::path::PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut out = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrl, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = path.trim_start_matches('/');
        match ctrl {
            "memory" => {
                out.push(std::path::Path::new("/sys/fs/cgroup/memory").join(path).join("memory.usage_in_bytes"))
            }
            "pids" => out.push(std::path::Path::new("/sys/fs/cgroup/pids").join(path).join("pids.current")),
            "" => {
                out.push(std::path::Path::new("/sys/fs/cgroup").join(path).join("memory.current"));
                out.push(std::path::Path::new("/sys/fs/cgroup").join(path).join("pids.current"));
            }
            _ => {}
        }
    }
    out.retain(|p| p.exists());
    out
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let iters = if ctx.plan.quick { 20 } else { 400 };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("pod.sock");
    let listener = UnixListener::bind(&path)?;
    let file = SocketFile::of(&path)?;
    let cg = cgroup_files();
    let cg_us = median_us(iters, || {
        for f in &cg {
            let _ = std::fs::read_to_string(f);
        }
    });
    let mut held = Vec::new();
    let mut rows = Vec::new();
    let mut details = serde_json::Map::new();
    for n in [1usize, 64, 1024] {
        while held.len() < n {
            let c = UnixStream::connect(&path)?;
            let (s, _) = listener.accept()?;
            held.push((c, s));
        }
        let got = count(file).context("sock_diag count")?;
        anyhow::ensure!(got == n, "sock_diag counted {got} of {n} open connections");
        let us = median_us(iters, || {
            let _ = count(file);
        });
        details.insert(format!("{n}"), json!({ "count_us": us, "counted": got }));
        rows.push(
            Row::new("10 sockdiag", format!("count at {n} connections"), "us", us)
                .baseline(cg_us, format!("read of the cgroup's counters ({} files)", cg.len())),
        );
    }
    details.insert("cgroup_read_us".into(), json!(cg_us));
    details.insert("iterations".into(), json!(iters));
    Ok(Figure { rows, details: serde_json::Value::Object(details) })
}
