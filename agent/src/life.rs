//! One instance from start to end, in one tracked task: spawn, wait for
//! readiness, wait for a client if warm, serve while the client uses it,
//! then reap and record the outcome. The task owns the instance's build
//! slot and alone releases it, after the wipe.

use crate::client::Client;
use crate::config::Scope;
use crate::instance::Instance;
use crate::phase::{EndReason, Phase};
use crate::reap::{self, EndCause};
use crate::shim::Shim;
use crate::spawn;
use crate::Ctx;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{info, warn, Instrument};

/// After a warm instance fails to start, the pool waits this long before
/// trying again, so a broken daemon does not spin.
pub const WARM_FAILURE_BACKOFF: Duration = Duration::from_secs(5);

/// A new instance for `client` (None: a warm one), with its id and dir.
pub fn new_instance(ctx: &Ctx, client: Option<&Client>) -> Arc<Instance> {
    let id = crate::sys::random_id();
    Instance::new(id.clone(), ctx.instances_dir().join(&id), client)
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
    match spawn::wait_ready(ctx, inst, &mut shim).await {
        Ok(via) => {
            info!(start_ms = inst.created.elapsed().as_millis() as u64, client = %inst.client().display, via = via.as_str(), steps = %shim.start_steps, "instance ready");
            ctx.metrics.ready(via.as_str());
            if !inst.warm {
                ctx.metrics.start_seconds.observe(inst.created.elapsed().as_secs_f64());
            }
            inst.mark_ready();
        }
        Err((e, outcome)) => {
            if !inst.warm {
                ctx.registry.note_failure(&inst.client(), &e);
            }
            ctx.registry.unregister(inst, true);
            inst.set_phase(Phase::Failed(e.clone()));
            if inst.warm {
                warn!("a warm instance failed to start; the pool retries in {WARM_FAILURE_BACKOFF:?}");
                ctx.registry.warm_failed(WARM_FAILURE_BACKOFF);
            }
            return reap::record(ctx, inst, EndCause::StartFailed(e.to_string()), outcome.as_ref());
        }
    }
    // A warm instance waits for its client; the pool's leftovers end when
    // the agent starts draining.
    if let Some(cause) = wait_claim(ctx, inst, &mut shim).await {
        inst.set_phase(Phase::Ending { note: None });
        let outcome = shim.stop(ctx).await;
        return reap::record(ctx, inst, cause, outcome.as_ref());
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
