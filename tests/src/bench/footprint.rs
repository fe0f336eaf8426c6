//! Figure 4: footprint. VmRSS of the agent idle (listening, no client), and
//! the RSS berth adds per active instance (agent + its berth-shim
//! children, daemons excluded) with 1, 8 and 32 instances, each held by an
//! open, proxied connection (`--scope connection`). Baselines: an idle
//! fakekitd started directly (a minimal tonic server, for the idle agent),
//! and the daemons' own RSS per instance (what berth wraps).

use crate::bench::env::{children_named, pss, rss, status_kb, temp_dir, BenchAgent, Conn, Direct};
use crate::bench::report::{Goal, Row};
use crate::bench::{Ctx, Figure};
use anyhow::{bail, Result};
use serde_json::json;
use std::time::Duration;

const MIB: f64 = (1 << 20) as f64;

fn daemon_pids(agent: &BenchAgent) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(agent.state_dir.join("instances")) {
        for e in rd.flatten() {
            if let Some(pid) = std::fs::read_to_string(e.path().join("daemon.pid"))
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
            {
                out.push(pid);
            }
        }
    }
    out
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let plan = &ctx.plan;
    let max = *plan.fp_counts.iter().max().unwrap_or(&1);
    let agent = BenchAgent::start(
        &ctx.bins,
        "footprint",
        (max as u32) * 2,
        &[
            "--scope",
            "connection",
            "--max-builds",
            &max.to_string(),
            "--build-memory",
            "64Mi",
            "--idle-timeout",
            "120s",
            "--stop-grace",
            "2s",
            "--queue-size",
            "0",
        ],
    )
    .await?;
    // Idle: listening, after its start-up settled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss(agent.pid).unwrap_or(0) as f64;
    let idle_anon = status_kb(agent.pid, "RssAnon").unwrap_or(0) as f64;
    let idle_pss = pss(agent.pid).unwrap_or(0) as f64;

    // Baseline for idle: fakekitd started directly, settled.
    let (base, _g) = temp_dir("berth-bench-fp-")?;
    let d = Direct::spawn(&ctx.bins.fakekitd, base.join("idle")).await?;
    {
        let c = Conn::open(&d.socket).await?;
        c.ping().await?;
        c.close();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fakekitd_idle = d.pid().and_then(rss).unwrap_or(0) as f64;
    d.kill().await;

    let mut conns = Vec::new();
    let mut rows = vec![Row::new("4 footprint", "agent VmRSS idle", "MiB", idle / MIB)
        .baseline(fakekitd_idle / MIB, "idle fakekitd (minimal tonic server)")
        .goal(Goal::Below(15.0), "< 15 MiB")];
    let mut points = Vec::new();
    let mut pss_rows = Vec::new();
    for &n in &plan.fp_counts {
        while conns.len() < n {
            let c = Conn::open(&agent.socket).await?;
            c.ping().await?;
            conns.push(c);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let a = rss(agent.pid).unwrap_or(0) as f64;
        let a_anon = status_kb(agent.pid, "RssAnon").unwrap_or(0) as f64;
        let shims = children_named(agent.pid, "berth-shim");
        if shims.len() != n {
            bail!("{} berth-shim children with {n} instances", shims.len());
        }
        let shim_rss: f64 = shims.iter().filter_map(|p| rss(*p)).sum::<u64>() as f64;
        let shim_anon: f64 = shims.iter().filter_map(|p| status_kb(*p, "RssAnon")).sum::<u64>() as f64;
        let a_pss = pss(agent.pid).unwrap_or(0) as f64;
        let shim_pss: f64 = shims.iter().filter_map(|p| pss(*p)).sum::<u64>() as f64;
        let daemons = daemon_pids(&agent);
        let daemon_rss: f64 = daemons.iter().filter_map(|p| rss(*p)).sum::<u64>() as f64;
        let per = (a + shim_rss - idle) / n as f64;
        rows.push(
            Row::new("4 footprint", format!("added VmRSS per instance @{n} (agent+shims)"), "MiB", per / MIB)
                .baseline(daemon_rss / n as f64 / MIB, "daemon (fakekitd) VmRSS per instance")
                .goal(Goal::Below(2.0), "< 2 MiB"),
        );
        points.push(json!({
            "instances": n,
            "agent_rss_mib": a / MIB,
            "agent_rss_anon_mib": a_anon / MIB,
            "agent_added_per_instance_mib": (a - idle) / n as f64 / MIB,
            "shim_rss_mib_each": shim_rss / n as f64 / MIB,
            "shim_rss_anon_mib_each": shim_anon / n as f64 / MIB,
            "daemon_rss_mib_each": daemon_rss / daemons.len().max(1) as f64 / MIB,
            "added_per_instance_mib": per / MIB,
            "shim_pss_mib_each": shim_pss / n as f64 / MIB,
            "added_pss_per_instance_mib": (a_pss + shim_pss - idle_pss) / n as f64 / MIB,
        }));
        pss_rows.push(Row::new(
            "4 footprint",
            format!("  same as PSS (shared pages split) @{n}"),
            "MiB",
            (a_pss + shim_pss - idle_pss) / n as f64 / MIB,
        ));
        progress!(
            "footprint: {n} instances: agent {:.1} MiB, shims {:.2} MiB each",
            a / MIB,
            shim_rss / n as f64 / MIB
        );
    }
    rows.extend(pss_rows);
    for c in conns {
        c.close();
    }
    agent.wait_instances(0, Duration::from_secs(60)).await?;
    // After the instances are gone: what the agent keeps.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss(agent.pid).unwrap_or(0) as f64;
    let leaks = agent.stop().await?;
    if !leaks.is_empty() {
        bail!("leaks after the footprint figure: {leaks:?}");
    }
    let details = json!({
        "agent_idle_rss_mib": idle / MIB,
        "agent_idle_rss_anon_mib": idle_anon / MIB,
        "agent_idle_pss_mib": idle_pss / MIB,
        "fakekitd_idle_rss_mib": fakekitd_idle / MIB,
        "agent_rss_after_all_ended_mib": after / MIB,
        "points": points,
    });
    Ok(Figure { rows, details })
}
