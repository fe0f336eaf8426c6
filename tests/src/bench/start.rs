//! Figure 1: start overhead. Through berth (`--scope connection`, so every
//! connection gets a fresh instance): clock from the client's connect to
//! the first byte from the daemon (its HTTP/2 SETTINGS, relayed by the
//! proxy once the instance is ready), and to the Fake.Ping reply. Baseline:
//! the same fakekitd spawned directly by the bench (no namespaces, no
//! cgroup), clock from spawn, connect as soon as it says it serves, same
//! call. Samples alternate between the paths; each berth sample waits
//! for the previous instance's wipe, so starts never overlap a teardown.
//!
//! A third path: an agent with `--warm 2 --warm-stage sandbox`, whose new
//! client claims a sandbox made ahead and its daemon execs then (the
//! daemon's boot is in the sample, as in the others). Before every sample
//! of any path that agent's pool is full again (both sandboxes held, the
//! previous one wiped), so its refill never overlaps a measured start.

use crate::bench::env::{self, direct_start, is_instance_end, msg_is, temp_dir, timed_ping, BenchAgent, StartSample};
use crate::bench::report::{p50, p99, summary, Goal, Row};
use crate::bench::{Ctx, Figure};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// One start through the agent: connect, Ping, close; then wait until the
/// instance has ended (wiped) so the next sample starts from quiet.
pub async fn berth_sample(agent: &BenchAgent) -> Result<StartSample> {
    berth_sample_at(agent, Instant::now()).await
}

async fn berth_sample_at(agent: &BenchAgent, t0: Instant) -> Result<StartSample> {
    let mark = agent.logs.mark();
    let (s, reply, conn) = timed_ping(&agent.socket, t0).await?;
    conn.close();
    let id = env::instance_id_of(&reply);
    let ended = agent
        .logs
        .wait(mark, |v| is_instance_end(v) && env::instance_of(v) == id.as_deref(), Duration::from_secs(30))
        .await;
    if ended.is_none() {
        bail!("instance {id:?} did not end within 30 s:\n{}", agent.logs.tail(20));
    }
    Ok(s)
}

/// Waits until the sandbox agent holds `n` unclaimed sandboxes and nothing
/// else (the previous client's instance is wiped).
async fn sandboxes_full(agent: &BenchAgent, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = agent.logs.count(0, |v| msg_is(v, "sandbox held"));
        let claims = agent.logs.count(0, |v| msg_is(v, "claimed a warm instance"));
        if held >= claims + n && agent.instance_count() == n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("sandbox pool not full after 60 s ({held} held, {claims} claimed):\n{}", agent.logs.tail(20));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// [`berth_sample`] that also records when the new daemon bound its socket
/// (inotify on the state dir; a little extra work during the sample, so
/// these samples are kept apart from the figure's).
async fn berth_sample_watched(agent: &BenchAgent) -> Result<StartSample> {
    let w = env::SocketWatch::arm(&agent.state_dir.join("instances"))?;
    let t0 = Instant::now();
    let watch = tokio::task::spawn_blocking(move || w.wait(Duration::from_secs(30)));
    let mut s = berth_sample_at(agent, t0).await?;
    let bound = watch.await.map_err(|e| anyhow::anyhow!("watch: {e}"))??;
    s.bound_ms = Some(bound.duration_since(t0).as_secs_f64() * 1e3);
    Ok(s)
}

/// How long moving a fresh process into a cgroup takes (writing its pid to
/// `cgroup.procs`), per v1 controller the agent uses, as berth-shim does
/// for every daemon (shim/src/run.rs `start`: `cgroup::join`). Returns ms
/// per controller, `n` fresh processes each.
fn cgroup_attach(n: usize) -> Result<Vec<(String, Vec<f64>)>> {
    use std::io::Write;
    let root = Path::new("/sys/fs/cgroup");
    let mut out = Vec::new();
    let mut guards = Vec::new();
    let mut dirs = Vec::new();
    for ctrl in ["memory", "cpu", "pids"] {
        if !root.join(ctrl).join("cgroup.procs").exists() {
            continue;
        }
        let d = root.join(ctrl).join(env::CGROUP_TOP).join(format!("attach-{}", std::process::id()));
        std::fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
        guards.push(env::register(env::Undo::Cgroup(d.clone())));
        dirs.push((ctrl.to_string(), d));
        out.push((ctrl.to_string(), Vec::new()));
    }
    for _ in 0..n {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().context("spawn sleep")?;
        let pid = child.id().to_string();
        for (k, (_, d)) in dirs.iter().enumerate() {
            let mut f = std::fs::OpenOptions::new().write(true).open(d.join("cgroup.procs"))?;
            let t0 = Instant::now();
            f.write_all(pid.as_bytes())?;
            out[k].1.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(guards);
    Ok(out)
}

/// Step name -> its durations (ms), in the order the steps first appear,
/// from `berth_shim::steps` renderings.
fn step_table(lines: impl Iterator<Item = String>) -> Vec<(String, Vec<f64>)> {
    let mut table: Vec<(String, Vec<f64>)> = Vec::new();
    for line in lines {
        for (name, ms) in berth_shim::steps::parse(&line) {
            match table.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push(ms),
                None => table.push((name, vec![ms])),
            }
        }
    }
    table
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let plan = &ctx.plan;
    let plan_quick = plan.quick;
    let agent = BenchAgent::start(
        &ctx.bins,
        "start",
        8,
        &["--scope", "connection", "--max-builds", "4", "--idle-timeout", "30s", "--stop-grace", "2s"],
    )
    .await?;
    let sandbox = BenchAgent::start(
        &ctx.bins,
        "start-sandbox",
        8,
        &["--scope", "connection", "--max-builds", "4", "--idle-timeout", "30s", "--stop-grace", "2s"]
            .into_iter()
            .chain(["--warm", "2", "--warm-stage", "sandbox"])
            .collect::<Vec<_>>(),
    )
    .await?;
    let (base, _g) = temp_dir("berth-bench-direct-")?;
    let mut direct: Vec<StartSample> = Vec::new();
    let mut berth: Vec<StartSample> = Vec::new();
    let mut held: Vec<StartSample> = Vec::new();
    let total = plan.warmup + plan.start_samples;
    let ready_mark = agent.logs.mark();
    for i in 0..total {
        let keep = i >= plan.warmup;
        // Alternate which path goes first, so drift hits both alike.
        for path in [[0, 1, 2], [1, 2, 0], [2, 0, 1]][i % 3] {
            sandboxes_full(&sandbox, 2).await?;
            if path == 0 {
                let (s, d) = direct_start(&ctx.bins.fakekitd, base.join(format!("d{i}"))).await?;
                d.kill().await;
                if keep {
                    direct.push(s);
                }
            } else {
                let s = berth_sample(if path == 1 { &agent } else { &sandbox }).await?;
                if keep {
                    if path == 1 { &mut berth } else { &mut held }.push(s);
                }
            }
        }
        if (i + 1) % 50 == 0 {
            progress!("start: {}/{total}", i + 1);
        }
    }
    // Where the time goes: connect -> daemon socket bound -> first byte,
    // on separate samples (the inotify watch adds a little work).
    let nb = if plan.quick { 3 } else { 50 };
    let (mut bb, mut db) = (Vec::new(), Vec::new());
    for i in 0..nb {
        bb.push(berth_sample_watched(&agent).await?);
        let (s, d) = direct_start(&ctx.bins.fakekitd, base.join(format!("w{i}"))).await?;
        d.kill().await;
        db.push(s);
    }
    // The agent's own view of each start: created -> ready (spawn, shim,
    // daemon start, readiness polling and probe).
    let start_ms: Vec<f64> = agent
        .logs
        .values(ready_mark)
        .iter()
        .filter(|v| msg_is(v, "instance ready"))
        .filter_map(|v| v.get("start_ms").and_then(Value::as_f64))
        .skip(plan.warmup)
        .take(berth.len())
        .collect();
    // Where the start's own time goes, step by step: the agent's part
    // (`steps` of "instance ready") and the shim's (its "start steps" line),
    // p50 of each step over the figure's samples.
    let agent_steps = step_table(
        agent
            .logs
            .values(ready_mark)
            .iter()
            .filter(|v| msg_is(v, "instance ready"))
            .skip(plan.warmup)
            .filter_map(|v| v.get("steps").and_then(Value::as_str).map(String::from)),
    );
    let shim_steps = step_table(
        agent
            .logs
            .raw_lines(ready_mark)
            .iter()
            .filter_map(|l| l.split_once("; start steps: ").map(|(_, s)| s.to_string()))
            .skip(plan.warmup),
    );
    let held_claims = sandbox.logs.count(0, |v| msg_is(v, "claimed a warm instance"));
    let mut leaks = agent.stop().await?;
    leaks.extend(sandbox.stop().await?);
    let attach = tokio::task::spawn_blocking(move || cgroup_attach(if plan_quick { 3 } else { 50 }))
        .await
        .map_err(|e| anyhow::anyhow!("cgroup attach: {e}"))??;
    if !leaks.is_empty() {
        bail!("leaks after the start figure: {leaks:?}");
    }

    let fb = |v: &[StartSample]| v.iter().map(|s| s.first_byte_ms).collect::<Vec<_>>();
    let call = |v: &[StartSample]| v.iter().map(|s| s.call_ms).collect::<Vec<_>>();
    let (bf, df) = (fb(&berth), fb(&direct));
    let base_is = "fakekitd spawned directly, same call";
    let rows = vec![
        Row::new("1 start", format!("connect->first byte p50 (n={})", bf.len()), "ms", p50(&bf))
            .baseline(p50(&df), base_is)
            .goal(Goal::OverheadAtMost(2.0), "overhead <= 2 ms (issue 15)"),
        Row::new("1 start", format!("connect->first byte p99 (n={})", bf.len()), "ms", p99(&bf))
            .baseline(p99(&df), base_is),
        Row::new("1 start", "connect->Ping reply p50", "ms", p50(&call(&berth))).baseline(p50(&call(&direct)), base_is),
        Row::new(
            "1 start",
            format!("connect->first byte p50 (n={}), --warm 2 --warm-stage sandbox", held.len()),
            "ms",
            p50(&fb(&held)),
        )
        .baseline(p50(&df), base_is)
        .goal(Goal::OverheadAtMost(2.0), "overhead <= 2 ms (issue 15)"),
        Row::new("1 start", "connect->first byte p99, sandbox", "ms", p99(&fb(&held))).baseline(p99(&df), base_is),
    ];
    let bound = |v: &[StartSample]| v.iter().filter_map(|s| s.bound_ms).collect::<Vec<_>>();
    let after = |v: &[StartSample]| v.iter().filter_map(|s| Some(s.first_byte_ms - s.bound_ms?)).collect::<Vec<_>>();
    let rows = {
        let mut rows = rows;
        rows.push(
            Row::new("1 start", format!("  breakdown: connect->socket bound p50 (n={nb})"), "ms", p50(&bound(&bb)))
                .baseline(p50(&bound(&db)), "direct: spawn->\"serving on\""),
        );
        rows.push(
            Row::new("1 start", "  breakdown: socket bound->first byte p50", "ms", p50(&after(&bb)))
                .baseline(p50(&after(&db)), "direct: \"serving on\"->first byte"),
        );
        if let Some((_, v)) = attach.iter().find(|(c, _)| c == "memory") {
            let pc = crate::bench::report::percentile;
            rows.push(Row::new(
                "1 start",
                format!("  v1 memory cgroup attach (pid -> cgroup.procs) p90 (n={}, p50 {:.2} ms)", v.len(), p50(v)),
                "ms",
                pc(v, 90.0),
            ));
            rows.push(Row::new("1 start", "  v1 memory cgroup attach p99", "ms", p99(v)));
        }
        for (who, table) in [("agent", &agent_steps), ("shim", &shim_steps)] {
            for (step, v) in table {
                rows.push(Row::new("1 start", format!("  step p50: {who} {step} (n={})", v.len()), "ms", p50(v)));
            }
        }
        rows
    };
    let mut agent_hist = std::collections::BTreeMap::new();
    for v in &start_ms {
        *agent_hist.entry(*v as u64).or_insert(0u32) += 1;
    }
    let details = json!({
        "cgroup_attach_ms": attach.iter().map(|(c, v)| (c.clone(), summary(v))).collect::<serde_json::Map<_, _>>(),
        "breakdown_samples": nb,
        "berth_bound_ms": summary(&bound(&bb)),
        "direct_bound_ms": summary(&bound(&db)),
        "berth_bound_to_first_byte_ms": summary(&after(&bb)),
        "direct_bound_to_first_byte_ms": summary(&after(&db)),
        "berth_bound_to_first_byte_raw": after(&bb),
        "agent_start_ms_histogram": agent_hist,
        "samples": bf.len(),
        "warmup": plan.warmup,
        "berth_first_byte_ms": summary(&bf),
        "sandbox_first_byte_ms": summary(&fb(&held)),
        "sandbox_claims": held_claims,
        "direct_first_byte_ms": summary(&df),
        "berth_call_ms": summary(&call(&berth)),
        "direct_call_ms": summary(&call(&direct)),
        "agent_start_ms": summary(&start_ms),
        "agent_steps_ms": agent_steps.iter().map(|(k, v)| (k.clone(), summary(v))).collect::<serde_json::Map<_, _>>(),
        "shim_steps_ms": shim_steps.iter().map(|(k, v)| (k.clone(), summary(v))).collect::<serde_json::Map<_, _>>(),
    });
    Ok(Figure { rows, details })
}
