//! Reaping: an instance ends when its client has been idle past the timeout,
//! when its daemon exits (crash, OOM kill), or when the agent shuts down. The
//! shim does the ordered teardown (SIGTERM, grace, SIGKILL of the pid
//! namespace, empty and remove the cgroup, wipe, release the ids); the agent
//! asks for it, collects the shim's outcome and records one log line, and,
//! for a pod's instance, a Kubernetes Event on the pod (`event`, `post`).

pub mod event;
pub mod post;

use crate::instance::Instance;
use crate::phase::{EndReason, Phase};
use crate::shim::{describe_exit, Shim};
use crate::Ctx;
use berth_shim::spec::Outcome;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// What ended an instance, as the life saw it; `record` turns it and the
/// shim's outcome into the `EndReason`.
#[derive(Debug, Clone)]
pub enum EndCause {
    Idle,
    Unpublished,
    Closed,
    DaemonExited,
    Drain,
    StartFailed(String),
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
                ctx.registry.unregister(inst, true);
                return cause;
            }
            _ = crate::count_until(&mut conns, |c| *c == 0) => {}
        }
        // Idle: a forced end, a new connection, or the idle timeout.
        tokio::select! {
            cause = forced_end(shim, &mut shutdown, &mut stop) => {
                ctx.registry.unregister(inst, true);
                return cause;
            }
            _ = crate::count_until(&mut conns, |c| *c > 0) => continue,
            _ = tokio::time::sleep(idle) => {
                if ctx.registry.unregister(inst, false) {
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
pub fn record(ctx: &Ctx, inst: &Instance, cause: EndCause, outcome: Option<&Outcome>) -> EndReason {
    let oom = outcome.map(|o| o.oom_kills > 0).unwrap_or(false);
    let disk = crate::disk::at_end(ctx, inst, outcome);
    let reason = match (&cause, outcome) {
        (EndCause::DaemonExited | EndCause::StartFailed(_), _) if oom => EndReason::Oom,
        (EndCause::DaemonExited, _) if disk.hit => EndReason::Disk,
        (EndCause::DaemonExited, Some(o)) if o.pids_limit_hits > 0 => EndReason::Pids,
        (EndCause::DaemonExited, _) => EndReason::DaemonExit,
        (EndCause::Idle, _) => EndReason::Idle,
        (EndCause::Unpublished, _) => EndReason::Unpublished,
        (EndCause::Closed, _) => EndReason::Closed,
        (EndCause::Drain, _) => EndReason::Drain,
        (EndCause::StartFailed(_), _) => EndReason::Error,
    };
    let leftovers = outcome.map(|o| o.leftovers.join("; ")).unwrap_or_default();
    info!(
        instance = %inst.id,
        client = %inst.client().display,
        reason = reason.as_str(),
        duration_ms = inst.created.elapsed().as_millis() as u64,
        peak_memory = outcome.and_then(|o| o.peak_memory),
        oom_killed = oom,
        pids_limit_hits = outcome.map(|o| o.pids_limit_hits).unwrap_or(0),
        exit_code = outcome.and_then(|o| o.exit_code),
        signal = outcome.and_then(|o| o.signal),
        shim_ms = outcome.map(|o| o.duration_ms),
        disk_limit = disk.limit,
        peak_disk = disk.peak,
        final_disk = disk.last,
        error = match &cause { EndCause::StartFailed(e) => Some(e.as_str()), _ => None },
        "instance ended"
    );
    if !leftovers.is_empty() {
        error!(instance = %inst.id, leftovers, "instance left something behind");
    }
    let limits = &ctx.run.limits;
    let why = match reason {
        EndReason::Oom => Some(format!(
            "its build hit the memory limit of {} and was OOM-killed",
            crate::config::quantity::format_bytes(limits.build_memory)
        )),
        EndReason::Disk => {
            Some(crate::disk::why(&disk, &outcome.map(describe_exit).unwrap_or_else(|| "the daemon died".into())))
        }
        EndReason::Pids => Some(format!("its build hit the limit of {} processes and threads", limits.build_pids)),
        EndReason::DaemonExit => Some(outcome.map(describe_exit).unwrap_or_else(|| "the daemon died".into())),
        EndReason::Drain => Some(format!("node {} is shutting down (drain timeout reached)", ctx.node_name)),
        EndReason::Unpublished => Some("the pod's berth volume was unpublished".into()),
        _ => None,
    };
    let tail = outcome.map(|o| crate::hints::for_stderr(&o.stderr_tail)).unwrap_or_default();
    if let Some(why) = &why {
        inst.set_end_note(format!("berth: instance {} ended: {why}{tail}", inst.id));
    }
    // Issue 15: the pod's Event carries the same words as the note.
    let event_why = match &cause {
        EndCause::StartFailed(e) if reason == EndReason::Error => Some(e.clone()),
        _ => why.map(|w| format!("{w}{tail}")),
    };
    pod_event(ctx, inst, reason, event_why.as_deref());
    if let Some(peak) = outcome.and_then(|o| o.peak_memory) {
        ctx.metrics.peak_memory_bytes.observe(peak as f64);
    }
    reason
}

/// For an instance of a pod (CSI): the log line and the queued Event on the
/// pod saying why it ended (see `event` for which ends get one).
pub fn pod_event(ctx: &Ctx, inst: &Instance, reason: EndReason, why: Option<&str>) {
    let Some(pod) = inst.client().pod else { return };
    if let Some(n) = event::notice(reason, &inst.id, why, ctx.run.idle_timeout) {
        ctx.events.report(ctx, &pod, &inst.id, &n);
    }
}

/// For an instance of a pod: the Event of a limit hit that did not end it.
fn hit_event(ctx: &Ctx, inst: &Instance, hit: event::Hit, limit: &str) {
    if let Some(pod) = inst.client().pod {
        ctx.events.report(ctx, &pod, &inst.id, &event::hit_notice(hit, &inst.id, limit));
    }
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
    let mut seen = berth_shim::cgroup::Usage::default();
    loop {
        tokio::select! {
            _ = inst.wiped() => return,
            _ = tokio::time::sleep(LIMIT_POLL) => {}
        }
        if !matches!(*inst.phase.borrow(), Phase::Ready) {
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
            let limit = crate::config::quantity::format_bytes(limits.build_memory);
            hit_event(&ctx, &inst, event::Hit::Memory { n: now.oom_kills }, &limit);
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
            hit_event(&ctx, &inst, event::Hit::Pids { n: now.pids_limit_hits }, &limits.build_pids.to_string());
        }
        seen = now;
    }
}
