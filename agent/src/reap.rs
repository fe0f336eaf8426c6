//! Reaping: an instance ends when its client has been idle past the timeout,
//! when its daemon exits (crash, OOM kill), or when the agent shuts down. The
//! shim does the ordered teardown (SIGTERM, grace, SIGKILL of the pid
//! namespace, empty and remove the cgroup, wipe, release the ids); the agent
//! asks for it, collects the shim's outcome and records one log line.
#![forbid(unsafe_code)]

use crate::instance::{unregister, Instance};
use crate::sys;
use crate::Ctx;
use berth_shim::spec::Outcome;
use nix::sys::signal::Signal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

/// How long past its stop grace a shim may take to wipe before the agent
/// falls back to `berth-shim delete`.
const WIPE_BUDGET: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub enum EndCause {
    Idle,
    Unpublished,
    Closed,
    DaemonExited,
    Drain,
    StartFailed(String),
}

/// A running shim: its pid, its lifeline (stdin: dropping it tells the shim
/// the agent is gone), and its report, read from stdout by a task.
pub struct Shim {
    pid: Option<u32>,
    id: String,
    dir: PathBuf,
    _lifeline: Option<ChildStdin>,
    done: Option<oneshot::Receiver<Option<Outcome>>>,
    outcome: Option<Option<Outcome>>,
}

impl Shim {
    pub fn new(mut child: Child, id: String, dir: PathBuf) -> Shim {
        let lifeline = child.stdin.take();
        let stdout = child.stdout.take();
        let pid = child.id();
        let (tx, rx) = oneshot::channel();
        let tag = id.clone();
        tokio::spawn(async move {
            // The outcome is handed on as soon as its line arrives: the shim
            // then still empties the instance's trash entry before it exits,
            // and the slot need not wait for that.
            let mut tx = Some(tx);
            if let Some(out) = stdout {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Outcome>(&line) {
                        Ok(o) => {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(Some(o));
                            }
                        }
                        Err(e) => warn!(instance = %tag, line, error = %e, "unreadable line from shim"),
                    }
                }
            }
            let status = child.wait().await;
            if let Some(tx) = tx.take() {
                error!(instance = %tag, ?status, "shim ended without an outcome");
                let _ = tx.send(None);
            } else if !status.as_ref().is_ok_and(|s| s.success()) {
                warn!(instance = %tag, ?status, "shim exited with an error after its outcome (see its log)");
            }
        });
        Shim { pid, id, dir, _lifeline: lifeline, done: Some(rx), outcome: None }
    }

    /// Resolves when the shim has ended; cancel-safe, so it can sit in a
    /// `select!` loop. Later calls return the same outcome at once.
    pub async fn ended(&mut self) -> Option<Outcome> {
        if let Some(o) = &self.outcome {
            return o.clone();
        }
        let o = match self.done.as_mut() {
            Some(rx) => rx.await.unwrap_or(None),
            None => None,
        };
        self.done = None;
        self.outcome = Some(o.clone());
        o
    }

    /// Asks the shim to tear down and waits for its outcome. A shim that does
    /// not finish in time is killed and the instance deleted from its files.
    pub async fn stop(&mut self, ctx: &Ctx) -> Option<Outcome> {
        if self.outcome.is_none() {
            if let Some(pid) = self.pid {
                if let Err(e) = sys::signal(pid, Signal::SIGTERM) {
                    warn!(error = %e, "could not signal the shim");
                }
            }
        }
        let budget = ctx.run.stop_grace + WIPE_BUDGET;
        match tokio::time::timeout(budget, self.ended()).await {
            Ok(o) if o.is_some() => o,
            res => {
                if res.is_err() {
                    error!(pid = ?self.pid, "shim did not finish its wipe in {budget:?}; killing it and deleting from files");
                    if let Some(pid) = self.pid {
                        let _ = sys::signal(pid, Signal::SIGKILL);
                    }
                }
                crate::recover::delete(ctx, &self.dir).await.or_else(|| {
                    error!(instance = %self.id, "delete of instance failed");
                    None
                })
            }
        }
    }
}

/// Serves until the instance should end, and says why. The instance leaves
/// the registry (so its client's next connection starts a fresh one) before
/// this returns.
pub async fn serve_until_end(ctx: &Arc<Ctx>, inst: &Arc<Instance>, shim: &mut Shim, idle: Duration) -> EndCause {
    let mut conns = inst.conns.subscribe();
    let mut shutdown = ctx.shutdown.subscribe();
    let mut stop = inst.stop.subscribe();
    loop {
        // In use: only a forced end ends it.
        tokio::select! {
            cause = forced_end(shim, &mut shutdown, &mut stop) => {
                unregister(ctx, inst, true);
                return cause;
            }
            _ = crate::count_until(&mut conns, |c| *c == 0) => {}
        }
        // Idle: a forced end, a new connection, or the idle timeout.
        tokio::select! {
            cause = forced_end(shim, &mut shutdown, &mut stop) => {
                unregister(ctx, inst, true);
                return cause;
            }
            _ = crate::count_until(&mut conns, |c| *c > 0) => continue,
            _ = tokio::time::sleep(idle) => {
                if unregister(ctx, inst, false) {
                    return if idle.is_zero() { EndCause::Closed } else { EndCause::Idle };
                }
            }
        }
    }
}

/// Ends that do not wait for the client: the daemon died, the agent shuts
/// down, or the pod's volume was unpublished. Cancel-safe.
async fn forced_end(
    shim: &mut Shim,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> EndCause {
    tokio::select! {
        _ = shim.ended() => EndCause::DaemonExited,
        _ = crate::raised(shutdown) => EndCause::Drain,
        _ = crate::raised(stop) => EndCause::Unpublished,
    }
}

/// The one structured line per instance: who, how long, how much memory,
/// and whether it was OOM-killed.
pub fn record(ctx: &Ctx, inst: &Instance, cause: EndCause, outcome: Option<&Outcome>) -> &'static str {
    let oom = outcome.map(|o| o.oom_kills > 0).unwrap_or(false);
    let reason = match (&cause, outcome) {
        (EndCause::DaemonExited | EndCause::StartFailed(_), _) if oom => "oom",
        (EndCause::DaemonExited, Some(o)) if o.pids_limit_hits > 0 => "pids",
        (EndCause::DaemonExited, _) => "daemon_exit",
        (EndCause::Idle, _) => "idle",
        (EndCause::Unpublished, _) => "unpublished",
        (EndCause::Closed, _) => "closed",
        (EndCause::Drain, _) => "drain",
        (EndCause::StartFailed(_), _) => "error",
    };
    let leftovers = outcome.map(|o| o.leftovers.join("; ")).unwrap_or_default();
    info!(
        instance = %inst.id,
        client = %inst.client().display,
        reason,
        duration_ms = inst.created.elapsed().as_millis() as u64,
        peak_memory = outcome.and_then(|o| o.peak_memory),
        oom_killed = oom,
        pids_limit_hits = outcome.map(|o| o.pids_limit_hits).unwrap_or(0),
        exit_code = outcome.and_then(|o| o.exit_code),
        signal = outcome.and_then(|o| o.signal),
        shim_ms = outcome.map(|o| o.duration_ms),
        error = match &cause { EndCause::StartFailed(e) => Some(e.as_str()), _ => None },
        "instance ended"
    );
    if !leftovers.is_empty() {
        error!(instance = %inst.id, leftovers, "instance left something behind");
    }
    let limits = &ctx.run.limits;
    let why = match reason {
        "oom" => Some(format!(
            "its build hit the memory limit of {} and was OOM-killed",
            crate::config::quantity::format_bytes(limits.build_memory)
        )),
        "pids" => Some(format!("its build hit the limit of {} processes and threads", limits.build_pids)),
        "daemon_exit" => Some(outcome.map(crate::spawn::describe_exit).unwrap_or_else(|| "the daemon died".into())),
        "drain" => Some(format!("node {} is shutting down (drain timeout reached)", ctx.node_name)),
        "unpublished" => Some("the pod's berth volume was unpublished".into()),
        _ => None,
    };
    if let Some(why) = why {
        let tail = outcome.map(|o| crate::hints::for_stderr(&o.stderr_tail)).unwrap_or_default();
        inst.end_note.send_replace(Some(format!("berth: instance {} ended: {why}{tail}", inst.id)));
    }
    if let Some(peak) = outcome.and_then(|o| o.peak_memory) {
        ctx.metrics.peak_memory_bytes.observe(peak as f64);
    }
    reason
}

/// How often a running instance's cgroup is read for limit hits.
const LIMIT_POLL: Duration = Duration::from_secs(1);

/// Watches a running instance's cgroup for limit hits that do not end it:
/// the OOM killer taking one build step (buildkit then reports the step's
/// exit code 137, not why), or a fork refused at the pids limit. Each new
/// hit gets a log line naming the limit, and a counter; the instance's end
/// line carries the totals.
pub async fn watch_limits(ctx: Arc<Ctx>, inst: Arc<Instance>) {
    let Ok(spec) = berth_shim::spec::Spec::load(&inst.dir) else { return };
    let mut wiped = inst.wiped.subscribe();
    let mut seen = berth_shim::cgroup::Usage::default();
    loop {
        tokio::select! {
            _ = crate::raised(&mut wiped) => return,
            _ = tokio::time::sleep(LIMIT_POLL) => {}
        }
        if !matches!(*inst.phase.borrow(), crate::instance::Phase::Ready) {
            continue;
        }
        let now = berth_shim::cgroup::usage(&spec.cgroup);
        let limits = &ctx.run.limits;
        if now.oom_kills > seen.oom_kills {
            ctx.metrics
                .limit_hits
                .get_or_create(&crate::metrics::ReasonLabel { reason: "memory".into() })
                .inc_by(now.oom_kills - seen.oom_kills);
            warn!(
                instance = %inst.id,
                client = %inst.client().display,
                oom_kills = now.oom_kills,
                limit = %crate::config::quantity::format_bytes(limits.build_memory),
                "a process of the build was OOM-killed at the memory limit (the client sees its step fail, exit code 137)"
            );
        }
        if now.pids_limit_hits > seen.pids_limit_hits {
            ctx.metrics
                .limit_hits
                .get_or_create(&crate::metrics::ReasonLabel { reason: "pids".into() })
                .inc_by(now.pids_limit_hits - seen.pids_limit_hits);
            warn!(
                instance = %inst.id,
                client = %inst.client().display,
                pids_limit_hits = now.pids_limit_hits,
                limit = limits.build_pids,
                "a fork in the build was refused at the pids limit"
            );
        }
        seen = now;
    }
}
