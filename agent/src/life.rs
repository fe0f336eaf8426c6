//! One instance from start to end, in one tracked task: spawn, wait for
//! readiness, wait for a client if warm, serve while the client uses it,
//! then reap and record the outcome. The task owns the instance's build
//! slot and alone releases it, after the wipe.

use crate::client::Client;
use crate::config::{Scope, WarmStage};
use crate::instance::Instance;
use crate::phase::{EndReason, Phase};
use crate::reap::{self, EndCause};
use crate::shim::Shim;
use crate::spawn;
use crate::Ctx;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{info, warn, Instrument};

/// After a warm instance fails to start, the pool waits this long before
/// trying again, so a broken daemon does not spin.
pub const WARM_FAILURE_BACKOFF: Duration = Duration::from_secs(5);

/// How long after a claimed sandbox's daemon answers the pool starts making
/// its replacement: the client's first exchange with the daemon (HTTP/2
/// settings, the session's first calls) happens in the first milliseconds,
/// and the making (files, cgroup, a fork and exec, a clone into new
/// namespaces, a veth) takes a few milliseconds of CPU that would compete
/// with it on a small node.
pub const REFILL_AFTER_READY: Duration = Duration::from_millis(50);

/// A new instance for `client` (None: a warm one), with its id and dir.
pub fn new_instance(ctx: &Ctx, client: Option<&Client>) -> Arc<Instance> {
    let id = crate::sys::random_id();
    let dir = ctx.instances_dir().join(&id);
    match (client, ctx.run.warm_stage) {
        (None, WarmStage::Sandbox) => Instance::sandbox(id, dir),
        _ => Instance::new(id, dir, client),
    }
}

/// Runs the instance's life in a tracked task, holding `slot` until wiped.
pub fn launch(ctx: Arc<Ctx>, inst: Arc<Instance>, slot: OwnedSemaphorePermit) {
    let span = tracing::info_span!(parent: None, "instance", instance = %inst.id, warm = inst.warm);
    let tracker = ctx.tasks.clone();
    tracker.spawn(life(ctx, inst, slot).instrument(span));
}

async fn life(ctx: Arc<Ctx>, inst: Arc<Instance>, slot: OwnedSemaphorePermit) {
    ctx.metrics.instances_active.inc();
    let reason = run_life(&ctx, &inst).await;
    ctx.metrics.instances_active.dec();
    ctx.metrics.ended(reason);
    ctx.metrics.build_seconds.observe(inst.created.elapsed().as_secs_f64());
    // The slot frees only now, after the shim's outcome: the instance's
    // processes, cgroup and ids are gone and its state has left every path
    // an instance can reach (moved to the trash, whose bytes the shim is
    // removing as we speak).
    drop(slot);
    inst.mark_wiped();
    ctx.warm_wanted.notify_one();
}

async fn run_life(ctx: &Arc<Ctx>, inst: &Arc<Instance>) -> EndReason {
    let mut shim = match spawn::start(ctx, inst).await {
        Ok(shim) => shim,
        Err(e) => {
            warn!(error = %e, "instance could not be created");
            if !inst.warm {
                ctx.registry.note_failure(&inst.client(), &e);
            }
            ctx.registry.unregister(inst, true);
            reap::pod_event(ctx, inst, EndReason::Error, Some(&e.to_string()));
            inst.set_phase(Phase::Failed(e));
            return EndReason::Error;
        }
    };
    // A sandbox is made up to the daemon's exec; any other instance starts
    // its daemon now.
    let made = match inst.held {
        true => spawn::held::wait(ctx, inst, &mut shim).await.map(|()| {
            info!(client = %inst.client().display, steps = %shim.start_steps, "sandbox held");
            inst.mark_held();
        }),
        false => spawn::wait_ready(ctx, inst, &mut shim).await.map(|via| became_ready(ctx, inst, &shim, via, None)),
    };
    if let Err((e, outcome)) = made {
        return start_failed(ctx, inst, e, outcome, inst.warm);
    }
    // A warm instance waits for its client; the pool's leftovers end when
    // the agent starts draining.
    if let Some(cause) = wait_claim(ctx, inst, &mut shim).await {
        inst.set_phase(Phase::Ending { note: None });
        let outcome = shim.stop(ctx).await;
        return reap::record(ctx, inst, cause, outcome.as_ref());
    }
    if inst.warm {
        ctx.metrics.warm_claimed(if inst.held { "sandbox" } else { "daemon" });
    }
    if inst.warm && !inst.held {
        inst.record_claim();
    }
    // A claimed sandbox: its daemon execs now, and the client waits for it
    // as for a cold start (its phase is `Starting`).
    if inst.held {
        let go = std::time::Instant::now();
        let listener = inst.listener.get().map(|l| l.as_fd());
        let ready = match shim.go(listener) {
            Ok(()) => spawn::wait_ready(ctx, inst, &mut shim).await,
            Err(e) => Err(spawn::held::go_failed(ctx, inst, &mut shim, e).await),
        };
        // The pool's replacement starts after this start's first exchange
        // (not at the claim, where making it would compete with this start
        // for the CPU; see REFILL_AFTER_READY).
        let c = ctx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REFILL_AFTER_READY).await;
            c.warm_wanted.notify_one();
        });
        match ready {
            Ok(via) => {
                became_ready(ctx, inst, &shim, via, Some(go));
                // Off the start's path: files, after the daemon answers.
                inst.record_claim();
            }
            // The client's start failed, as a cold one would have.
            Err((e, outcome)) => return start_failed(ctx, inst, e, outcome, false),
        }
    }
    // A client of one connection (connection scope, or a peer the agent
    // cannot tell apart from others) ends with its connection.
    let scope_idle = match ctx.run.scope {
        Scope::Client if !inst.client().is_one_connection() => ctx.run.idle_timeout,
        _ => Duration::ZERO,
    };
    tokio::spawn(reap::watch_limits(ctx.clone(), inst.clone()));
    tokio::spawn(crate::disk::watch(ctx.clone(), inst.clone()));
    let cause = reap::serve_until_end(ctx, inst, &mut shim, scope_idle).await;
    inst.set_phase(Phase::Ending { note: None });
    let outcome = shim.stop(ctx).await;
    reap::record(ctx, inst, cause, outcome.as_ref())
}

/// A start that failed: unregistered, `Failed` for the connections waiting
/// on it, recorded. `pool`: the pool's own start (the pool rests) rather
/// than a client's (the client's failure is cached).
fn start_failed(
    ctx: &Arc<Ctx>,
    inst: &Arc<Instance>,
    e: crate::error::AdmitError,
    outcome: Option<berth_shim::spec::Outcome>,
    pool: bool,
) -> EndReason {
    if pool {
        warn!("a warm instance failed to start; the pool retries in {WARM_FAILURE_BACKOFF:?}");
        ctx.registry.warm_failed(WARM_FAILURE_BACKOFF);
    } else {
        ctx.registry.note_failure(&inst.client(), &e);
    }
    ctx.registry.unregister(inst, true);
    inst.set_phase(Phase::Failed(e.clone()));
    reap::record(ctx, inst, EndCause::StartFailed(e.to_string()), outcome.as_ref())
}

/// The daemon answers: log, count, and make the instance `Ready` (or
/// `WarmIdle`). `go`: when a claimed sandbox's daemon was told to exec (its
/// start counts from there).
fn became_ready(ctx: &Ctx, inst: &Instance, shim: &Shim, via: spawn::ReadyVia, go: Option<std::time::Instant>) {
    let start_ms = go.map_or(inst.created, |g| g).elapsed().as_millis() as u64;
    if let Some(g) = go {
        ctx.metrics.sandbox_start_seconds.observe(g.elapsed().as_secs_f64());
    }
    let steps = if go.is_some() { "held=sandbox" } else { shim.start_steps.as_str() };
    // First: connections waiting on the instance go on while this logs.
    inst.mark_ready();
    info!(start_ms, client = %inst.client().display, via = via.as_str(), steps = %steps, "instance ready");
    ctx.metrics.ready(via.as_str());
    if !inst.warm {
        ctx.metrics.start_seconds.observe(inst.created.elapsed().as_secs_f64());
    }
}

/// For a warm instance, waits until a client claims it (None: serve), the
/// agent drains or its daemon dies (the cause to end it unclaimed). Other
/// instances are claimed from the start.
async fn wait_claim(ctx: &Arc<Ctx>, inst: &Arc<Instance>, shim: &mut Shim) -> Option<EndCause> {
    let mut phase = inst.phase.subscribe();
    let mut draining = ctx.draining.subscribe();
    // bkconfig: a reloaded --buildkitd-config retires the unclaimed warm
    // instances (started with the old one; the pool refills with the new).
    let mut bkconfig = ctx.bkconfig.subscribe();
    // Retired for its slot (handoff: a pod socket found no free slot); it is
    // out of the pool already.
    let mut stop = inst.stop.subscribe();
    let cause = tokio::select! {
        _ = stop.wait_for(|s| *s) => return Some(EndCause::Idle),
        _ = async { let _ = phase.wait_for(|p| !matches!(p, Phase::WarmIdle)).await.map(|_| ()); } => return None,
        _ = crate::raised(&mut draining) => EndCause::Drain,
        _ = shim.ended() => EndCause::DaemonExited,
        Ok(()) = bkconfig.changed() => {
            info!("buildkitd config reloaded: the unclaimed warm instance ends (as idle), a fresh one replaces it");
            EndCause::Idle
        }
    };
    // Out of the pool under the registry lock, which claims hold too: a
    // claim that got there first wins and the client is served.
    ctx.registry.end_unclaimed(inst).then_some(cause)
}
