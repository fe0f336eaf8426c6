//! Figure 12: issue 15's figures with the real buildkitd and buildctl. Opt-in
//! (`--only realbuild --buildkitd P --buildctl P --base-layout DIR`), never
//! in the default set nor in CI, which has no real daemon: fakekitd stands in
//! for it in every other figure.
//!
//! One agent runs the real buildkitd, with a CSI endpoint (the bench plays
//! kubelet, as in figure 11) and the default pod sockets (`handoff`).
//! - **Start.** connect -> ListWorkers answered (`buildctl debug workers`,
//!   exec included) on the socket of a freshly published pod, so every
//!   sample starts a fresh instance; against the same daemon binary started
//!   by hand, rootless in namespaces of its own (hand.rs): spawn -> READY=1
//!   -> `buildctl debug workers` answered. A third side: a second agent
//!   with `--warm 1 --warm-stage sandbox`, whose fresh pod claims the
//!   sandbox made ahead (its pool full before each sample). Samples rotate;
//!   each ends its instance (unpublish) or daemon before the next.
//! - **Build.** A Dockerfile `FROM busybox` (the base layout) + `COPY` of a
//!   context of random files + a `RUN` that reads every byte, sent (i)
//!   through a pod socket, (ii) through the node socket (the agent's proxy),
//!   and straight to the same daemons' own instance sockets, the baselines:
//!   same daemon, same namespaces, cgroup, disk and limits, only the path
//!   differs. Two instances serve the whole figure (the pod's and the node
//!   client's, reused); before every build the daemon's cache is pruned
//!   (untimed), so each build sends the whole context and runs every step;
//!   the output is checked for both. With no export and with
//!   `--output type=local` (the result, context included, sent back).
//!   The four paths rotate in each round; the figure is the median.

pub mod buildctl;
pub mod hand;

use crate::bench::env::{self, cpu_time, BenchAgent};
use crate::bench::podsock::Pod;
use crate::bench::report::{p50, summary, Row};
use crate::bench::{Ctx, Figure};
use anyhow::{anyhow, bail, Context, Result};
use buildctl::Tools;
use serde_json::json;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Sizes and counts of figure 12.
#[derive(Debug, Clone)]
pub struct RealPlan {
    pub tools: Tools,
    /// Rounds of builds (each path once per round and export mode).
    pub rounds: usize,
    /// Start samples per side.
    pub starts: usize,
    /// Context size in MiB, as 4 files.
    pub context_mib: u64,
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits until the warm-sandbox agent holds its one sandbox and nothing
/// else (the previous pod's instance wiped, the replacement held).
async fn sandbox_full(agent: &BenchAgent) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let held = agent.logs.count(0, |v| env::msg_is(v, "sandbox held"));
        let claims = agent.logs.count(0, |v| env::msg_is(v, "pod's socket handed to a warm sandbox"));
        if held > claims && agent.instance_count() == 1 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("no sandbox held after 120 s ({held} held, {claims} claimed):\n{}", agent.logs.tail(20));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The pod whose socket the builds use.
const BUILD_POD: &str = "rb";

fn instances(agent: &BenchAgent) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(agent.state_dir.join("instances"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The instance that `f` started: the one entry it added.
async fn started_by<F: std::future::Future<Output = Result<buildctl::Run>>>(
    agent: &BenchAgent,
    f: F,
) -> Result<(String, buildctl::Run)> {
    let before = instances(agent);
    let run = f.await?;
    let after = instances(agent);
    let new: Vec<&String> = after.iter().filter(|i| !before.contains(i)).collect();
    match new.as_slice() {
        [one] => Ok(((*one).clone(), run)),
        _ => bail!("expected one new instance, have {before:?} -> {after:?}:\n{}", agent.logs.tail(20)),
    }
}

/// `n` bytes of incompressible data in 4 files under `dir`.
fn make_context(dir: &Path, n: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rnd = std::fs::File::open("/dev/urandom")?;
    for i in 0..4 {
        let p = dir.join(format!("blob{i}"));
        let mut f = std::fs::File::create(&p).with_context(|| p.display().to_string())?;
        std::io::copy(&mut Read::take(&mut rnd, n / 4), &mut f)?;
        f.flush()?;
    }
    Ok(())
}

/// The paths of the build part: (name, socket the build is sent to, the
/// same daemon's own socket for its prune).
struct Path4<'a> {
    name: &'static str,
    send: &'a Path,
    daemon: &'a Path,
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let plan = ctx.real.as_ref().ok_or_else(|| {
        anyhow!("figure realbuild needs --buildkitd PATH --buildctl PATH --base-layout DIR (the real upstream tools)")
    })?;
    let tools = &plan.tools;
    let (tmp, _tmp_g) = env::temp_dir("bbr-")?;
    let csi = tmp.join("csi.sock");
    let kubelet = tmp.join("kubelet");
    let bkd = tools.buildkitd.display().to_string();
    // The agent's flags; `extra` for the warm-sandbox agent of the start part.
    let args = |tag: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--daemon",
            bkd.as_str(),
            "--max-builds",
            "2",
            "--idle-timeout",
            "1h",
            // The limit covers the whole machine, so it does not bind and
            // the hand-started baseline (no cgroup) is on equal terms.
            "--build-cpus",
            "2",
            "--reserve-cpus",
            "0",
            "--stop-grace",
            "5s",
            "--start-timeout",
            "180s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(format!("--csi-endpoint=unix://{}", tmp.join(format!("{tag}csi.sock")).display()));
        v.push(format!("--kubelet-dir={}", tmp.join(format!("{tag}kubelet")).display()));
        v.push(format!("--run-dir={}", tmp.join(format!("{tag}run")).display()));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let main_args = args("", &[]);
    let agent = BenchAgent::start(&ctx.bins, "realbuild", 4, &refs(&main_args)).await?;
    // The start through a warm sandbox (`--warm-stage sandbox`): a fresh
    // pod's first connection claims the sandbox made ahead, whose daemon
    // execs with the pod's listener.
    let sb_args = args("sb-", &["--warm", "1", "--warm-stage", "sandbox"]);
    let sandbox = BenchAgent::start(&ctx.bins, "realbuild-sandbox", 4, &refs(&sb_args)).await?;
    let (sb_csi, sb_kubelet) = (tmp.join("sb-csi.sock"), tmp.join("sb-kubelet"));

    // Start: a fresh pod instance against a hand-started daemon, alternating.
    let mut berth_start = Vec::new();
    let mut hand_start = Vec::new();
    let mut hand_ready = Vec::new();
    let mut warm = Vec::new();
    let mut sb_start = Vec::new();
    let mut log_mark = 0;
    // Sample 0 is a warm-up of each side (the binaries' first page-ins), not kept.
    for k in 0..=plan.starts {
        if k == 1 {
            berth_start.clear();
            hand_start.clear();
            hand_ready.clear();
            warm.clear();
            sb_start.clear();
            log_mark = agent.logs.mark();
        }
        for side in [[0, 1, 2], [1, 2, 0], [2, 0, 1]][k % 3] {
            if side == 2 {
                sandbox_full(&sandbox).await?;
                let pod = Pod::publish(&sb_csi, &sb_kubelet, &format!("w{k}")).await?;
                let run = buildctl::workers(tools, &pod.socket()).await.context("through a warm sandbox")?;
                if !run.output.contains("berth-") {
                    bail!(
                        "ListWorkers through the sandbox's pod socket did not name a berth instance:\n{}",
                        run.output
                    );
                }
                sb_start.push(run.secs);
                pod.unpublish(&sb_csi).await?;
            } else if side == 0 {
                let pod = Pod::publish(&csi, &kubelet, &format!("s{k}")).await?;
                let run = buildctl::workers(tools, &pod.socket()).await.context("through a fresh pod socket")?;
                if !run.output.contains("berth-") {
                    bail!("ListWorkers through the pod socket did not name a berth instance:\n{}", run.output);
                }
                berth_start.push(run.secs);
                pod.unpublish(&csi).await?;
                agent.wait_instances(0, Duration::from_secs(120)).await?;
            } else {
                let dir = tmp.join(format!("hand-{k}"));
                let t0 = Instant::now();
                let h = hand::Hand::start(&tools.buildkitd, dir, hand::id_base(), t0).await?;
                buildctl::workers(tools, &h.socket).await.context("hand-started daemon")?;
                hand_start.push(t0.elapsed().as_secs_f64());
                hand_ready.push(h.ready_secs);
                warm.push(buildctl::workers(tools, &h.socket).await?.secs);
                h.stop().await?;
            }
        }
        progress!("realbuild: start {k}/{} (0: warm-up)", plan.starts);
    }
    let sb_claims = sandbox.logs.count(0, |v| env::msg_is(v, "pod's socket handed to a warm sandbox"));
    let sb_leaks = sandbox.stop().await?;
    if !sb_leaks.is_empty() {
        bail!("leaks after the warm-sandbox starts: {sb_leaks:?}");
    }
    if sb_claims != plan.starts + 1 {
        bail!("{sb_claims} of {} sandbox starts came from the pool", plan.starts + 1);
    }
    let start_ms: Vec<f64> = agent
        .logs
        .values(log_mark)
        .iter()
        .filter(|v| env::msg_is(v, "instance ready"))
        .filter_map(|v| v.get("start_ms").and_then(|x| x.as_f64()))
        .collect();

    // Build: two instances reused, four paths.
    let ctx_bytes = plan.context_mib << 20;
    let context = tmp.join("context");
    let dockerfile = tmp.join("dockerfile");
    make_context(&context, ctx_bytes)?;
    std::fs::create_dir_all(&dockerfile)?;
    std::fs::write(dockerfile.join("Dockerfile"), buildctl::DOCKERFILE)?;
    let pod = Pod::publish(&csi, &kubelet, BUILD_POD).await?;
    let pod_sock = pod.socket();
    let (pod_id, _) = started_by(&agent, buildctl::workers(tools, &pod_sock)).await?;
    let node_sock = agent.socket.clone();
    let (node_id, _) = started_by(&agent, buildctl::workers(tools, &node_sock)).await?;
    let own = |id: &str| berth_shim::spec::socket_path(&agent.state_dir.join("instances").join(id));
    let (pod_direct, node_direct) = (own(&pod_id), own(&node_id));
    // ListWorkers on the running pod instance: its pod socket against its
    // own socket, alternating (a buildctl process each).
    let mut running = [Vec::new(), Vec::new()];
    for k in 0..plan.starts {
        for side in [k % 2, 1 - k % 2] {
            let sock = if side == 0 { &pod_sock } else { &pod_direct };
            running[side].push(buildctl::workers(tools, sock).await?.secs);
        }
    }
    let paths = [
        Path4 { name: "pod", send: &pod_sock, daemon: &pod_direct },
        Path4 { name: "pod-direct", send: &pod_direct, daemon: &pod_direct },
        Path4 { name: "node", send: &node_sock, daemon: &node_direct },
        Path4 { name: "node-direct", send: &node_direct, daemon: &node_direct },
    ];
    let exports = ["none", "local"];
    let out_dir = tmp.join("out");
    // One untimed build per daemon: its first-build setup and the context's
    // page cache.
    for p in [&paths[0], &paths[2]] {
        buildctl::prune(tools, p.daemon).await?;
        let args = buildctl::build_args(tools, &context, &dockerfile, None);
        buildctl::call(tools, p.send, &args).await.with_context(|| format!("warm-up build via {}", p.name))?;
    }
    let mut secs = vec![vec![Vec::new(); paths.len()]; exports.len()];
    let mut agent_cpu = vec![vec![Vec::new(); paths.len()]; exports.len()];
    for r in 0..plan.rounds {
        for (e, export) in exports.iter().enumerate() {
            for j in 0..paths.len() {
                let i = (j + r + e) % paths.len();
                let p = &paths[i];
                buildctl::prune(tools, p.daemon).await?;
                let dest = (*export == "local").then(|| out_dir.clone());
                let args = buildctl::build_args(tools, &context, &dockerfile, dest.as_deref());
                let c0 = cpu_time(agent.pid).unwrap_or_default();
                let run = buildctl::call(tools, p.send, &args)
                    .await
                    .with_context(|| format!("build via {} ({export})", p.name))?;
                agent_cpu[e][i].push(cpu_time(agent.pid).unwrap_or_default().saturating_sub(c0).as_secs_f64());
                check_build(&run.output, ctx_bytes, dest.as_deref())
                    .with_context(|| format!("build via {}", p.name))?;
                let _ = std::fs::remove_dir_all(&out_dir);
                secs[e][i].push(run.secs);
            }
        }
        progress!("realbuild: build round {}/{}", r + 1, plan.rounds);
    }
    pod.unpublish(&csi).await?;
    let leaks = agent.stop().await?;
    if !leaks.is_empty() {
        bail!("leaks after the real-buildkitd figure: {leaks:?}");
    }

    let n = plan.starts;
    let mut rows = vec![Row::new(
        "12 realbuild",
        format!("connect -> ListWorkers answered, fresh pod-socket instance, buildctl (p50 of {n})"),
        "s",
        p50(&berth_start),
    )
    .baseline(p50(&hand_start), "hand-started rootless buildkitd: spawn -> READY=1 -> buildctl ListWorkers answered")];
    rows.push(
        Row::new(
            "12 realbuild",
            format!("connect -> ListWorkers answered, pod socket, warm sandbox (--warm-stage sandbox, p50 of {n})"),
            "s",
            p50(&sb_start),
        )
        .baseline(
            p50(&hand_start),
            "hand-started rootless buildkitd: spawn -> READY=1 -> buildctl ListWorkers answered",
        ),
    );
    rows.push(
        Row::new(
            "12 realbuild",
            format!("  instance start as the agent logs it, start_ms (p50 of {n})"),
            "s",
            p50(&start_ms) / 1e3,
        )
        .baseline(p50(&hand_ready), "hand-started daemon: spawn -> READY=1"),
    );
    rows.push(
        Row::new(
            "12 realbuild",
            format!("ListWorkers on a running instance, pod socket, buildctl (p50 of {n})"),
            "s",
            p50(&running[0]),
        )
        .baseline(p50(&running[1]), "the same daemon on its own instance socket"),
    );
    rows.push(Row::new("12 realbuild", format!("  same, hand-started daemon (p50 of {n})"), "s", p50(&warm)));
    let mib = plan.context_mib;
    for (e, export) in exports.iter().enumerate() {
        let what = if *export == "none" { "no export" } else { "--output type=local" };
        for (b, d, via) in [(0, 1, "pod socket"), (2, 3, "node socket")] {
            rows.push(
                Row::new(
                    "12 realbuild",
                    format!("{mib} MiB-context build, {what}, {via} (median of {})", plan.rounds),
                    "s",
                    p50(&secs[e][b]),
                )
                .baseline(p50(&secs[e][d]), "the same daemon on its own instance socket"),
            );
        }
        rows.push(
            Row::new(
                "12 realbuild",
                format!("  agent CPU per build, {what}, node socket"),
                "CPU-s",
                p50(&agent_cpu[e][2]),
            )
            .baseline(p50(&agent_cpu[e][0]), "agent CPU per build on the pod socket"),
        );
    }
    let pair_ratios: Vec<Vec<Vec<f64>>> = (0..exports.len())
        .map(|e| {
            [(0, 1), (2, 3)]
                .iter()
                .map(|(b, d)| secs[e][*b].iter().zip(&secs[e][*d]).map(|(x, y)| x / y).collect())
                .collect()
        })
        .collect();
    let details = json!({
        "tools": {"buildkitd": tools.buildkitd, "buildctl": tools.buildctl, "base_layout": tools.base_layout},
        "start": {
            "berth_s": berth_start, "hand_s": hand_start, "hand_ready_s": hand_ready, "warm_workers_s": warm,
            "agent_start_ms": start_ms, "running_pod_s": running[0], "running_direct_s": running[1], "berth": summary(&berth_start), "hand": summary(&hand_start),
        },
        "build": {
            "context_bytes": ctx_bytes, "rounds": plan.rounds, "exports": exports,
            "paths": paths.iter().map(|p| p.name).collect::<Vec<_>>(),
            "seconds": secs, "agent_cpu_s": agent_cpu,
            "pair_ratios_pod_node": pair_ratios,
        },
    });
    Ok(Figure { rows, details })
}

/// A build that did what the figure claims: the whole context sent (the
/// cache was pruned), the RUN step read all of it, and an export arrived.
fn check_build(output: &str, ctx_bytes: u64, dest: Option<&Path>) -> Result<()> {
    let sent = buildctl::context_sent(output).unwrap_or(0);
    // go-units prints 4 significant digits.
    if (sent as f64) < ctx_bytes as f64 * 0.99 {
        bail!(
            "the context was not sent whole ({sent} of {ctx_bytes} bytes): a cache hit?\n{}",
            buildctl::tail(output, 30)
        );
    }
    if !buildctl::read_count(output, ctx_bytes) {
        bail!("the RUN step did not print {ctx_bytes}:\n{}", buildctl::tail(output, 30));
    }
    if let Some(d) = dest {
        let got: u64 =
            (0..4).filter_map(|i| std::fs::metadata(d.join(format!("ctx/blob{i}"))).ok()).map(|m| m.len()).sum();
        if got != ctx_bytes {
            bail!("the export holds {got} bytes of the context in {}, want {ctx_bytes}", d.display());
        }
    }
    Ok(())
}
