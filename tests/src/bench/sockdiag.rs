//! Figure 10: the cost of counting a pod socket's connections (issue 15).
//! On the fd path the daemon accepts the pod's connections, and idle
//! reaping asks the kernel how many there are: one sock_diag dump of the
//! unix sockets (`berth_agent::handoff::diag::count`), every 250 ms per
//! fd-passed instance. Measured with 1, 64 and 1024 connections open on one
//! listener (accepted, as the daemon holds them). The same-run baseline is
//! the alternative the issue names: one read of the instance cgroup's
//! counters (memory usage and the pids count), which cost about the same
//! but cannot tell a connection open from none.
//!
//! The pod's own network namespace (the default case since handoff is the
//! default): the same counts with the clients connecting from a namespace of
//! their own ([`crate::podnet`]), so the accepted ends live there, counted
//! by `berth_agent::handoff::netns::Counter` (this process plays the daemon:
//! its pid is in the `daemon.pid` it reads). Against the count in the agent's
//! namespace at the same number of connections; and the first count, which
//! also finds the namespace (`pidfd_getfd` of each of the daemon's sockets,
//! SIOCGSKNS, a thread that enters it), against a later one.

use crate::bench::report::Row;
use crate::bench::{Ctx, Figure};
use anyhow::{Context, Result};
use berth_agent::handoff::diag::{count, SocketFile};
use berth_agent::handoff::netns::Counter;
use berth_shim::spec::{PidStamp, DAEMON_PID_FILE};
use serde_json::json;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
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
    let mut agent_ns_us = Vec::new();
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
        agent_ns_us.push(us);
        rows.push(
            Row::new("10 sockdiag", format!("count at {n} connections"), "us", us)
                .baseline(cg_us, format!("read of the cgroup's counters ({} files)", cg.len())),
        );
    }
    drop(held);
    pod_namespace(&dir, iters, &agent_ns_us, &mut rows, &mut details).await?;
    details.insert("cgroup_read_us".into(), json!(cg_us));
    details.insert("iterations".into(), json!(iters));
    Ok(Figure { rows, details: serde_json::Value::Object(details) })
}

/// The rows of the pod's-own-namespace case; `agent_ns_us` are the counts
/// in the agent's namespace at 1, 64 and 1024 connections, from above.
async fn pod_namespace(
    dir: &tempfile::TempDir,
    iters: usize,
    agent_ns_us: &[f64],
    rows: &mut Vec<Row>,
    details: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let pod = crate::podnet::PodNet::new();
    let path = dir.path().join("pod-ns.sock");
    let listener = UnixListener::bind(&path)?;
    let file = SocketFile::of(&path)?;
    // The instance dir the counter reads the daemon's pid from: this process.
    let inst = dir.path().join("instance");
    std::fs::create_dir_all(&inst)?;
    let proc_root = Path::new("/proc");
    std::fs::write(inst.join(DAEMON_PID_FILE), PidStamp::of(proc_root, std::process::id() as i32)?.render())?;
    let mut counter = Counter::new(listener.as_fd(), file, &inst, proc_root).context("counter")?;
    let mut held = Vec::new();
    for (k, n) in [1usize, 64, 1024].into_iter().enumerate() {
        while held.len() < n {
            let p = path.clone();
            let c = pod.spawn(move || async move { UnixStream::connect(&p) }).await??;
            let (s, _) = listener.accept()?;
            held.push((c, s));
        }
        anyhow::ensure!(count(file)? == 0, "the pod's connections showed in the agent's namespace");
        let got = counter.count().context("count in the pod's namespace")?;
        anyhow::ensure!(got == n, "counted {got} of {n} connections open in the pod's namespace");
        let us = median_us(iters, || {
            let _ = counter.count();
        });
        // A fresh counter each time: the first count finds the namespace.
        let mut firsts = Vec::new();
        for _ in 0..(iters / 10).max(3) {
            let t = Instant::now();
            let mut c = Counter::new(listener.as_fd(), file, &inst, proc_root)?;
            let got = c.count()?;
            firsts.push(t.elapsed().as_secs_f64() * 1e6);
            anyhow::ensure!(got == n, "a first count found {got} of {n}");
        }
        firsts.sort_by(|a, b| a.total_cmp(b));
        let first_us = firsts[firsts.len() / 2];
        details.insert(format!("pod_ns_{n}"), json!({ "count_us": us, "first_count_us": first_us, "counted": got }));
        rows.push(
            Row::new("10 sockdiag", format!("count at {n} connections, pod's own namespace"), "us", us)
                .baseline(agent_ns_us[k], "count at as many in the agent's namespace"),
        );
        rows.push(
            Row::new("10 sockdiag", format!("  first count at {n}, finding the namespace"), "us", first_us)
                .baseline(us, "a later count (namespace known)"),
        );
    }
    Ok(())
}
