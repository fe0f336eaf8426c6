//! berth-bench: the six figures of issue 8, the disk limit's (issue 13), the isolated network's
//! (issue 12) and the flood of issue 18, each against a baseline
//! measured in the same run, printed as one table. Figure 12 (`realbuild`,
//! the real buildkitd) is opt-in: `--only realbuild` with the real tools.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p berth-tests --bin berth-bench -- --full
//! ```
//!
//! `--quick` runs every figure with few iterations and small sizes, only to
//! prove it works (tests/tests/bench.rs runs it). Must run as root. Every
//! agent, cgroup (under `berth-bench/`), mount, loop device, process and
//! temp dir the bench starts is undone on exit, on a panic, and on
//! SIGINT/SIGTERM. Method per figure: docs/benchmarks.md.

#[macro_use]
pub mod env;
pub mod concurrency;
pub mod disk;
pub mod flood;
pub mod footprint;
pub mod network;
pub mod podsock;
pub mod proxy;
pub mod realbuild;
pub mod report;
pub mod sockdiag;
pub mod start;
pub mod throughput;
pub mod warm;
pub mod wipe;

use anyhow::Result;
use clap::Parser;
use env::Bins;
use report::Row;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "berth-bench",
    about = "berth's benchmark suite: start, throughput, wipe, footprint, concurrency, warm pool, flood"
)]
struct Cli {
    /// Full sizes and iteration counts (the default).
    #[arg(long, conflicts_with = "quick")]
    full: bool,
    /// Few iterations and small sizes: proves every figure works, measures nothing.
    #[arg(long)]
    quick: bool,
    /// only these figures (comma-separated: start,throughput,wipe,footprint,concurrency,warm,disk,network,flood,sockdiag,podsock;
    /// realbuild only when named here, with --buildkitd, --buildctl and --base-layout).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also write the rows, per-figure details and machine facts as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Echo the agents' log lines to stderr.
    #[arg(long)]
    verbose: bool,
    /// An extra flag for every agent the bench starts (repeatable; use
    /// `--agent-arg=--flag=value`), for experiments.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Figure 2: Echo message size in bytes (default 1 MiB; quick 256 KiB).
    #[arg(long, hide = true)]
    tp_chunk: Option<usize>,
    /// Figure 2: bytes each way per transfer.
    #[arg(long, hide = true)]
    tp_bytes: Option<u64>,
    /// Figure 2: transfers per path (median of these).
    #[arg(long, hide = true)]
    tp_reps: Option<usize>,
    /// Figure 1: samples per path.
    #[arg(long, hide = true)]
    start_samples: Option<usize>,
    /// Figure 3: iterations per variant.
    #[arg(long, hide = true)]
    wipe_iters: Option<usize>,
    /// Figure 12 (realbuild): the real buildkitd binary the agent runs.
    #[arg(long)]
    buildkitd: Option<PathBuf>,
    /// Figure 12: the real buildctl client.
    #[arg(long)]
    buildctl: Option<PathBuf>,
    /// Figure 12: an OCI image layout that stands in for `FROM busybox`.
    #[arg(long)]
    base_layout: Option<PathBuf>,
    /// Figure 12: build rounds (each path once per round and export mode; default 3, quick 1).
    #[arg(long, hide = true)]
    real_rounds: Option<usize>,
    /// Figure 12: start samples per side (default 10, quick 2).
    #[arg(long, hide = true)]
    real_starts: Option<usize>,
    /// Figure 12: context size in MiB (default 256, quick 16).
    #[arg(long, hide = true)]
    real_context_mib: Option<u64>,
}

/// Sizes and iteration counts.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    /// Figure 1: starts per path (direct and through berth), after `warmup`.
    pub start_samples: usize,
    pub warmup: usize,
    /// Figure 2: bytes each way per transfer, message size, transfers per path.
    pub tp_bytes: u64,
    pub tp_chunk: usize,
    pub tp_reps: usize,
    /// Figure 3: iterations per variant, files and total bytes of the tree.
    pub wipe_iters: usize,
    pub wipe_files: usize,
    pub wipe_bytes: u64,
    /// Figure 4: active instance counts.
    pub fp_counts: Vec<usize>,
    /// Figure 5: concurrent clients per burst, bursts, sequential clients.
    pub conc_clients: usize,
    pub conc_rounds: usize,
    pub seq_clients: usize,
    /// Figure 6: pool size and samples per path.
    pub warm_pool: usize,
    pub warm_samples: usize,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            quick: false,
            start_samples: 200,
            warmup: 5,
            tp_bytes: 1 << 30,
            tp_chunk: 1 << 20,
            tp_reps: 3,
            wipe_iters: 10,
            wipe_files: 10_000,
            wipe_bytes: 1 << 30,
            fp_counts: vec![1, 8, 32],
            conc_clients: 32,
            conc_rounds: 4,
            seq_clients: 500,
            warm_pool: 4,
            warm_samples: 200,
        }
    }

    pub fn quick() -> Plan {
        Plan {
            quick: true,
            start_samples: 8,
            warmup: 1,
            tp_bytes: 16 << 20,
            tp_chunk: 256 << 10,
            tp_reps: 1,
            wipe_iters: 2,
            wipe_files: 100,
            wipe_bytes: 4 << 20,
            fp_counts: vec![1, 2, 4],
            conc_clients: 4,
            conc_rounds: 1,
            seq_clients: 10,
            warm_pool: 2,
            warm_samples: 6,
        }
    }
}

pub struct Ctx {
    pub bins: Bins,
    pub plan: Plan,
    /// Figure 12's tools and sizes (`--buildkitd`, `--buildctl`, `--base-layout`).
    pub real: Option<realbuild::RealPlan>,
}

/// What a figure hands back: its table rows and free-form details.
pub struct Figure {
    pub rows: Vec<Row>,
    pub details: Value,
}

pub const FIGURES: [&str; 12] = [
    "start",
    "throughput",
    "wipe",
    "footprint",
    "concurrency",
    "warm",
    "disk",
    "network",
    "flood",
    "sockdiag",
    "podsock",
    "realbuild",
];

/// Figures run only when `--only` names them: they need tools CI lacks.
pub const OPT_IN: [&str; 1] = ["realbuild"];

async fn run_figure(name: &str, ctx: &Ctx) -> Result<Figure> {
    match name {
        "start" => start::run(ctx).await,
        "throughput" => throughput::run(ctx).await,
        "wipe" => wipe::run(ctx).await,
        "footprint" => footprint::run(ctx).await,
        "concurrency" => concurrency::run(ctx).await,
        "warm" => warm::run(ctx).await,
        "disk" => disk::run(ctx).await,
        "network" => network::run(ctx).await,
        "flood" => flood::run(ctx).await,
        "sockdiag" => sockdiag::run(ctx).await,
        "podsock" => podsock::run(ctx).await,
        "realbuild" => realbuild::run(ctx).await,
        other => anyhow::bail!("unknown figure {other}"),
    }
}

/// Machine facts for the report header and the docs.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let cgroup = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2 (unified)"
    } else if std::path::Path::new("/sys/fs/cgroup/unified").exists() {
        "v1 (hybrid: v1 controllers + unified)"
    } else {
        "v1"
    };
    let tmp = std::env::temp_dir();
    json!({
        "cpu": model,
        "cores": cores,
        "memory_mib": mem_kb / 1024,
        "kernel": kernel,
        "cgroup": cgroup,
        "tmp_dir": tmp.display().to_string(),
        "tmp_fs": wipe::fs_of(&tmp),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

pub fn main() -> i32 {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("__proxy") {
        proxy::main(&argv[2..]);
    }
    let cli = Cli::parse();
    env::install_signal_cleanup();
    *env::EXTRA_AGENT_ARGS.lock().unwrap() = cli.agent_args.clone();
    if cli.verbose {
        env::VERBOSE.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("berth-bench: must run as root (it starts berth-agent, cgroups, mounts)");
        return 2;
    }
    let bins = match Bins::find() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("berth-bench: {e:#}");
            return 2;
        }
    };
    let mut plan = if cli.quick { Plan::quick() } else { Plan::full() };
    plan.tp_chunk = cli.tp_chunk.unwrap_or(plan.tp_chunk).max(1);
    plan.tp_bytes = cli.tp_bytes.unwrap_or(plan.tp_bytes).max(1);
    plan.tp_reps = cli.tp_reps.unwrap_or(plan.tp_reps).max(1);
    plan.start_samples = cli.start_samples.unwrap_or(plan.start_samples).max(1);
    plan.wipe_iters = cli.wipe_iters.unwrap_or(plan.wipe_iters).max(1);
    let selected: Vec<&str> = if cli.only.is_empty() {
        for f in OPT_IN {
            progress!("figure {f}: SKIPPED: opt-in, needs the real upstream tools (--only {f} --buildkitd PATH --buildctl PATH --base-layout DIR)");
        }
        FIGURES.iter().copied().filter(|f| !OPT_IN.contains(f)).collect()
    } else {
        let mut v = Vec::new();
        for o in &cli.only {
            match FIGURES.iter().find(|f| **f == o.as_str()) {
                Some(f) => v.push(*f),
                None => {
                    eprintln!("berth-bench: unknown figure {o:?}; figures: {}", FIGURES.join(","));
                    return 2;
                }
            }
        }
        v
    };
    let real = match (cli.buildkitd, cli.buildctl, cli.base_layout) {
        (None, None, None) => None,
        (Some(d), Some(c), Some(l)) => match realbuild::buildctl::Tools::new(d, c, l) {
            Ok(tools) => Some(realbuild::RealPlan {
                tools,
                rounds: cli.real_rounds.unwrap_or(if plan.quick { 1 } else { 3 }).max(1),
                starts: cli.real_starts.unwrap_or(if plan.quick { 2 } else { 10 }).max(1),
                context_mib: cli.real_context_mib.unwrap_or(if plan.quick { 16 } else { 256 }).max(1),
            }),
            Err(e) => {
                eprintln!("berth-bench: {e:#}");
                return 2;
            }
        },
        _ => {
            eprintln!("berth-bench: --buildkitd, --buildctl and --base-layout go together (figure realbuild)");
            return 2;
        }
    };
    if selected.contains(&"realbuild") && real.is_none() {
        eprintln!(
            "berth-bench: figure realbuild needs the real upstream tools: --buildkitd PATH --buildctl PATH \
             --base-layout DIR (an OCI layout for FROM busybox); CI has none, fakekitd stands in elsewhere"
        );
        return 2;
    }
    let ctx = Ctx { bins, plan, real };
    let mach = machine();
    let load_before = env::loadavg();
    progress!(
        "{} mode, figures {}; load average {load_before}; binaries in {}",
        if ctx.plan.quick { "quick" } else { "full" },
        selected.join(","),
        ctx.bins.agent.parent().map(|p| p.display().to_string()).unwrap_or_default()
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut details = serde_json::Map::new();
    let mut errors = Vec::new();
    for name in &selected {
        let t = Instant::now();
        progress!("figure {name}: running");
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                errors.push(format!("{name}: runtime: {e}"));
                continue;
            }
        };
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(run_figure(name, &ctx))));
        drop(rt);
        env::park_if_shutting_down();
        match res {
            Ok(Ok(f)) => {
                progress!("figure {name}: done in {:.1} s", t.elapsed().as_secs_f64());
                rows.extend(f.rows);
                details.insert(name.to_string(), f.details);
            }
            Ok(Err(e)) => {
                progress!("figure {name}: FAILED: {e:#}");
                errors.push(format!("{name}: {e:#}"));
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                progress!("figure {name}: PANICKED: {msg}");
                errors.push(format!("{name}: panic: {msg}"));
            }
        }
    }
    env::park_if_shutting_down();
    env::run_all();
    let load_after = env::loadavg();
    println!(
        "berth-bench ({} mode, {} build) on {}, {} cores, {} MiB, kernel {}, cgroup {}, temp fs {}",
        if ctx.plan.quick { "quick" } else { "full" },
        mach["profile"].as_str().unwrap_or("?"),
        mach["cpu"].as_str().unwrap_or("?"),
        mach["cores"],
        mach["memory_mib"],
        mach["kernel"].as_str().unwrap_or("?"),
        mach["cgroup"].as_str().unwrap_or("?"),
        mach["tmp_fs"].as_str().unwrap_or("?"),
    );
    println!("load average before: {load_before}; after: {load_after}; took {:.0} s", started.elapsed().as_secs_f64());
    println!("ratio = berth / baseline (same run); p50/p99 are nearest-rank percentiles\n");
    print!("{}", report::table(&rows));
    for e in &errors {
        println!("ERROR {e}");
    }
    if let Some(path) = &cli.json {
        let doc = json!({
            "mode": if ctx.plan.quick { "quick" } else { "full" },
            "machine": mach,
            "load_before": load_before,
            "load_after": load_after,
            "seconds": started.elapsed().as_secs_f64(),
            "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "details": Value::Object(details),
            "errors": errors,
        });
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default()) {
            eprintln!("berth-bench: {}: {e}", path.display());
            return 1;
        }
    }
    if errors.is_empty() {
        0
    } else {
        1
    }
}
