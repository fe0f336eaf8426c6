//! One instance from start to end: spawn, wait for readiness, serve while
//! the client uses it, then reap and record the outcome.
#![forbid(unsafe_code)]

use crate::admit::{AdmitError, Client};
use crate::config::Scope;
use crate::reap::{self, EndCause};
use crate::spawn;
use crate::Ctx;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::{info, warn, Instrument};

#[derive(Debug, Clone)]
pub enum Phase {
    Starting,
    Ready,
    Failed(AdmitError),
    Ended,
}

pub struct Instance {
    pub id: String,
    pub client: Client,
    pub dir: PathBuf,
    pub phase: watch::Sender<Phase>,
    /// Active connections.
    pub conns: watch::Sender<usize>,
    pub created: Instant,
    /// Set to end the instance now (its pod's volume was unpublished).
    pub stop: watch::Sender<bool>,
    /// Set once the instance is wiped and its slot is free.
    pub wiped: watch::Sender<bool>,
    /// The build slot, held from spawn until the wipe is done.
    slot: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

impl Instance {
    pub fn new(ctx: &Ctx, client: &Client, slot: OwnedSemaphorePermit) -> Arc<Instance> {
        let id = crate::sys::random_id();
        Arc::new(Instance {
            dir: ctx.instances_dir().join(&id),
            id,
            client: client.clone(),
            phase: watch::Sender::new(Phase::Starting),
            conns: watch::Sender::new(0),
            created: Instant::now(),
            slot: std::sync::Mutex::new(Some(slot)),
            stop: watch::Sender::new(false),
            wiped: watch::Sender::new(false),
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir
            .join(berth_shim::spec::RUN_DIR)
            .join(berth_shim::spec::SOCKET_NAME)
    }
}

/// Runs the instance's life in a tracked task.
pub fn launch(ctx: Arc<Ctx>, inst: Arc<Instance>) {
    let span = tracing::info_span!("instance", instance = %inst.id, client = %inst.client.display);
    let tracker = ctx.tasks.clone();
    tracker.spawn(life(ctx, inst).instrument(span));
}

/// Removes the instance from the registry if it is still the one registered
/// for its client and, unless `force`, has no connection. Returns whether
/// the instance may end.
pub fn unregister(ctx: &Ctx, inst: &Arc<Instance>, force: bool) -> bool {
    let mut reg = ctx.registry.lock().expect("registry lock");
    if !force && *inst.conns.borrow() > 0 {
        return false;
    }
    if reg
        .get(&inst.client.key)
        .is_some_and(|i| Arc::ptr_eq(i, inst))
    {
        reg.remove(&inst.client.key);
    }
    true
}

async fn life(ctx: Arc<Ctx>, inst: Arc<Instance>) {
    ctx.metrics.instances_active.inc();
    let reason = run_life(&ctx, &inst).await;
    ctx.metrics.instances_active.dec();
    ctx.metrics.ended(reason);
    ctx.metrics.build_seconds.observe(inst.created.elapsed().as_secs_f64());
    // The slot frees only now, after the wipe: the next build must not
    // start while this one's state is still on disk.
    inst.slot.lock().expect("slot lock").take();
    inst.wiped.send_replace(true);
}

async fn run_life(ctx: &Arc<Ctx>, inst: &Arc<Instance>) -> &'static str {
    let (ctx, inst) = (ctx.clone(), inst.clone());
    let mut shim = match spawn::start(&ctx, &inst).await {
        Ok(shim) => shim,
        Err(e) => {
            warn!(error = %e, "instance could not be created");
            unregister(&ctx, &inst, true);
            inst.phase.send_replace(Phase::Failed(e));
            return "error";
        }
    };
    match spawn::wait_ready(&ctx, &inst, &mut shim).await {
        Ok(()) => {
            info!(start_ms = inst.created.elapsed().as_millis() as u64, "instance ready");
            ctx.metrics.start_seconds.observe(inst.created.elapsed().as_secs_f64());
            inst.phase.send_replace(Phase::Ready);
        }
        Err((e, outcome)) => {
            unregister(&ctx, &inst, true);
            inst.phase.send_replace(Phase::Failed(e.clone()));
            return reap::record(&ctx, &inst, EndCause::StartFailed(e.to_string()), outcome.as_ref());
        }
    }
    let scope_idle = match ctx.run.scope {
        Scope::Client => ctx.run.idle_timeout,
        Scope::Connection => std::time::Duration::ZERO,
    };
    let cause = reap::serve_until_end(&ctx, &inst, &mut shim, scope_idle).await;
    inst.phase.send_replace(Phase::Ended);
    let outcome = shim.stop(&ctx).await;
    reap::record(&ctx, &inst, cause, outcome.as_ref())
}
