//! Figure 6: warm pool. Start latency (connect to the first byte from the
//! daemon, as in figure 1) through an agent with `--warm N` and through one
//! without a pool (the baseline), both `--scope connection` (each
//! connection is a new client and claims one warm instance). Before every
//! pool sample the pool is full again and the previous instance is wiped,
//! so each sample sees a non-empty pool and a quiet machine; the baseline
//! waits for the previous wipe likewise. Samples alternate between agents.

use crate::bench::env::{msg_is, timed_ping, BenchAgent, StartSample};
use crate::bench::report::{p50, p99, summary, Goal, Row};
use crate::bench::start::berth_sample;
use crate::bench::{Ctx, Figure};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn warm_ready(v: &Value) -> bool {
    msg_is(v, "instance ready") && v.get("client").and_then(Value::as_str) == Some("warm (unclaimed)")
}

fn claimed(v: &Value) -> bool {
    msg_is(v, "claimed a warm instance")
}

/// Waits until the pool holds `n` ready, unclaimed instances and nothing
/// else runs (the previous client's instance is wiped).
async fn wait_full(agent: &BenchAgent, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = agent.logs.count(0, warm_ready);
        let claims = agent.logs.count(0, claimed);
        if ready >= claims + n && agent.instance_count() == n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "warm pool not full after 60 s ({ready} ready, {claims} claimed, {} instances):\n{}",
                agent.instance_count(),
                agent.logs.tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let plan = &ctx.plan;
    let n = plan.warm_pool;
    let slots = (n + 2).to_string();
    let warm_flag = n.to_string();
    let common = ["--scope", "connection", "--max-builds", &slots, "--stop-grace", "2s", "--build-memory", "256Mi"];
    let mut wargs: Vec<&str> = common.to_vec();
    wargs.extend(["--warm", &warm_flag]);
    let warm = BenchAgent::start(&ctx.bins, "warm", (n as u32 + 2) * 2, &wargs).await?;
    let cold = BenchAgent::start(&ctx.bins, "cold", (n as u32 + 2) * 2, &common).await?;

    let (mut w, mut c): (Vec<StartSample>, Vec<StartSample>) = (Vec::new(), Vec::new());
    let mut not_from_pool = 0usize;
    let total = plan.warmup + plan.warm_samples;
    for i in 0..total {
        let keep = i >= plan.warmup;
        for path in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            if path == 0 {
                wait_full(&warm, n).await?;
                let claims = warm.logs.count(0, claimed);
                let (s, _reply, conn) = timed_ping(&warm.socket, Instant::now()).await?;
                conn.close();
                // The claim's log line may trail the reply by a moment.
                if !warm.logs.wait_count(0, claims + 1, claimed, Duration::from_secs(2)).await {
                    not_from_pool += 1;
                }
                if keep {
                    w.push(s);
                }
            } else {
                // The warm agent's refill (a replacement started by the
                // last claim) must not overlap the baseline's start.
                wait_full(&warm, n).await?;
                let s = berth_sample(&cold).await?;
                if keep {
                    c.push(s);
                }
            }
        }
        if (i + 1) % 50 == 0 {
            progress!("warm: {}/{total}", i + 1);
        }
    }
    wait_full(&warm, n).await?;
    let mut leaks = warm.stop().await?;
    leaks.extend(cold.stop().await?);
    if !leaks.is_empty() {
        bail!("leaks after the warm figure: {leaks:?}");
    }
    let fb = |v: &[StartSample]| v.iter().map(|s| s.first_byte_ms).collect::<Vec<_>>();
    let call = |v: &[StartSample]| v.iter().map(|s| s.call_ms).collect::<Vec<_>>();
    let (wf, cf) = (fb(&w), fb(&c));
    let base_is = "same agent flags without --warm (cold start)";
    let rows = vec![
        Row::new("6 warm", format!("--warm {n}: connect->first byte p50 (n={})", wf.len()), "ms", p50(&wf))
            .baseline(p50(&cf), base_is)
            .goal(Goal::AtMost(20.0), "<= 20 ms"),
        Row::new("6 warm", format!("--warm {n}: connect->first byte p99"), "ms", p99(&wf)).baseline(p99(&cf), base_is),
        Row::new("6 warm", format!("--warm {n}: connect->Ping reply p50"), "ms", p50(&call(&w)))
            .baseline(p50(&call(&c)), base_is),
    ];
    let details = json!({
        "pool": n,
        "samples": wf.len(),
        "warm_first_byte_ms": summary(&wf),
        "cold_first_byte_ms": summary(&cf),
        "warm_call_ms": summary(&call(&w)),
        "cold_call_ms": summary(&call(&c)),
        "samples_not_served_from_pool": not_from_pool,
    });
    Ok(Figure { rows, details })
}
