//! Figure 5: concurrency. Through one agent (`--scope connection
//! --max-builds 32`): bursts of 32 clients connecting at once (each
//! connect, Ping, close; the next burst after every instance is wiped), then
//! 500 clients one after the other (each starts as soon as the previous
//! one's call returned: its teardown overlaps the next start). Every
//! failure is counted; at the end every instance must have ended and the
//! leak scan (processes, cgroups, mounts, instance dirs, leases, sockets)
//! must be empty. Baseline: the same clients against fakekitd spawned
//! directly, with the same concurrency.

use crate::bench::env::{self, direct_start, is_instance_end, temp_dir, timed_ping, BenchAgent, StartSample};
use crate::bench::report::{p50, p99, summary, Goal, Row};
use crate::bench::{Ctx, Figure};
use anyhow::Result;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

#[derive(Default)]
struct Tally {
    samples: Vec<StartSample>,
    failures: usize,
    errors: Vec<String>,
}

impl Tally {
    fn add(&mut self, r: Result<StartSample>) {
        match r {
            Ok(s) => self.samples.push(s),
            Err(e) => {
                self.failures += 1;
                if self.errors.len() < 5 {
                    self.errors.push(format!("{e:#}"));
                }
            }
        }
    }
    fn fb(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.first_byte_ms).collect()
    }
}

async fn berth_client(socket: PathBuf) -> Result<StartSample> {
    let (s, _reply, conn) = timed_ping(&socket, Instant::now()).await?;
    conn.close();
    Ok(s)
}

async fn direct_client(fakekitd: PathBuf, dir: PathBuf) -> Result<StartSample> {
    let (s, d) = direct_start(&fakekitd, dir).await?;
    d.kill().await;
    Ok(s)
}

/// The agent's own start times (created -> ready) logged from `mark` on.
fn ready_ms(agent: &BenchAgent, mark: usize) -> Vec<f64> {
    agent
        .logs
        .values(mark)
        .iter()
        .filter(|v| env::msg_is(v, "instance ready"))
        .filter_map(|v| v.get("start_ms").and_then(serde_json::Value::as_f64))
        .collect()
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let plan = &ctx.plan;
    let c = plan.conc_clients;
    let agent = BenchAgent::start(
        &ctx.bins,
        "concurrency",
        (c as u32) * 2,
        &[
            "--scope",
            "connection",
            "--max-builds",
            &c.to_string(),
            "--queue-size",
            "256",
            "--build-memory",
            "256Mi",
            "--stop-grace",
            "2s",
        ],
    )
    .await?;
    let (base, _g) = temp_dir("berth-bench-conc-")?;
    let mark = agent.logs.mark();

    let (mut burst_b, mut burst_d) = (Tally::default(), Tally::default());
    for round in 0..plan.conc_rounds {
        let mut set = JoinSet::new();
        for _ in 0..c {
            set.spawn(berth_client(agent.socket.clone()));
        }
        while let Some(r) = set.join_next().await {
            burst_b.add(r.unwrap_or_else(|e| Err(anyhow::anyhow!("task: {e}"))));
        }
        agent.wait_instances(0, Duration::from_secs(120)).await?;
        let mut set = JoinSet::new();
        for k in 0..c {
            set.spawn(direct_client(ctx.bins.fakekitd.clone(), base.join(format!("b{round}-{k}"))));
        }
        while let Some(r) = set.join_next().await {
            burst_d.add(r.unwrap_or_else(|e| Err(anyhow::anyhow!("task: {e}"))));
        }
        progress!("concurrency: burst {}/{} of {c}", round + 1, plan.conc_rounds);
    }

    let burst_start_ms = ready_ms(&agent, mark);
    let seq_mark = agent.logs.mark();
    let (mut seq_b, mut seq_d) = (Tally::default(), Tally::default());
    for i in 0..plan.seq_clients {
        seq_b.add(berth_client(agent.socket.clone()).await);
        if (i + 1) % 100 == 0 {
            progress!("concurrency: sequential {}/{}", i + 1, plan.seq_clients);
        }
    }
    for i in 0..plan.seq_clients {
        seq_d.add(direct_client(ctx.bins.fakekitd.clone(), base.join(format!("s{i}"))).await);
    }

    let seq_start_ms = ready_ms(&agent, seq_mark);
    // Every instance ends and leaves nothing.
    let clients = c * plan.conc_rounds + plan.seq_clients;
    // Ended: every instance dir is gone (the agent removes it last). The
    // "instance ended" log lines are counted too, raw: a line can reach
    // the log spliced with a shim's stderr output (see `garbled`).
    agent.wait_instances(0, Duration::from_secs(180)).await?;
    let _ = agent.logs.wait_count(mark, clients, is_instance_end, Duration::from_secs(5)).await;
    let ended = agent.logs.count(mark, is_instance_end);
    let ended_raw = agent.logs.raw_count(mark, "\"instance ended\"");
    let garbled = agent.logs.garbled(mark);
    let mut leaks = agent.wait_clean(Duration::from_secs(30)).await;
    if ended_raw < clients {
        leaks.push(format!("only {ended_raw} of {clients} instances logged their end"));
    }
    let reasons: Vec<String> = agent
        .logs
        .values(mark)
        .iter()
        .filter(|v| is_instance_end(v))
        .filter_map(|v| v.get("reason").and_then(|r| r.as_str()).map(String::from))
        .filter(|r| r != "closed")
        .collect();
    let leak_scan_during = leaks.len();
    leaks.extend(agent.stop().await?);

    let failures_b = burst_b.failures + seq_b.failures;
    let failures_d = burst_d.failures + seq_d.failures;
    let (bb, bd, sb, sd) = (burst_b.fb(), burst_d.fb(), seq_b.fb(), seq_d.fb());
    let burst_is = format!("{c} direct fakekitd spawns at once");
    let seq_is = "direct fakekitd spawns, one after the other";
    let rows = vec![
        Row::new("5 concurrency", format!("{c} at once: start p50 (n={})", bb.len()), "ms", p50(&bb))
            .baseline(p50(&bd), burst_is.clone()),
        Row::new("5 concurrency", format!("{c} at once: start p99"), "ms", p99(&bb)).baseline(p99(&bd), burst_is),
        Row::new("5 concurrency", format!("{} sequential: start p50", plan.seq_clients), "ms", p50(&sb))
            .baseline(p50(&sd), seq_is),
        Row::new("5 concurrency", format!("{} sequential: start p99", plan.seq_clients), "ms", p99(&sb))
            .baseline(p99(&sd), seq_is),
        Row::new("5 concurrency", format!("failures of {} clients", clients), "count", failures_b as f64)
            .baseline(failures_d as f64, "failures of the direct clients")
            .goal(Goal::AtMost(0.0), "0"),
        Row::new("5 concurrency", "leaks after (scan + agent exit)", "count", leaks.len() as f64)
            .goal(Goal::AtMost(0.0), "0"),
        Row::new("5 concurrency", "  agent log records spliced with shim stderr", "count", garbled.len() as f64),
    ];
    let berth_errors: Vec<String> = burst_b.errors.iter().chain(&seq_b.errors).cloned().collect();
    let direct_errors: Vec<String> = burst_d.errors.iter().chain(&seq_d.errors).cloned().collect();
    let details = json!({
        "burst_clients": c,
        "bursts": plan.conc_rounds,
        "sequential_clients": plan.seq_clients,
        "berth_burst_first_byte_ms": summary(&bb),
        "direct_burst_first_byte_ms": summary(&bd),
        "berth_sequential_first_byte_ms": summary(&sb),
        "direct_sequential_first_byte_ms": summary(&sd),
        "agent_start_ms_bursts": summary(&burst_start_ms),
        "agent_start_ms_sequential": summary(&seq_start_ms),
        "berth_failures": failures_b,
        "direct_failures": failures_d,
        "berth_errors": berth_errors,
        "direct_errors": direct_errors,
        "instance_end_lines_parsed": ended,
        "instance_end_lines_raw": ended_raw,
        "agent_log_lines_garbled": garbled.len(),
        "garbled_examples": garbled.iter().take(3).collect::<Vec<_>>(),
        "end_reasons_other_than_closed": reasons,
        "leaks": leaks,
        "leaks_found_by_scan_before_exit": leak_scan_during,
    });
    let _ = env::verbose();
    Ok(Figure { rows, details })
}
