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
    /// Who the instance serves; a warm instance gets its client at claim.
    client: std::sync::RwLock<Client>,
    /// Started ahead for the warm pool; `claimed` says when a client took it.
    pub warm: bool,
    pub claimed: watch::Sender<bool>,
    pub dir: PathBuf,
    pub phase: watch::Sender<Phase>,
    /// Active connections.
    pub conns: watch::Sender<usize>,
    pub created: Instant,
    /// Set to end the instance now (its pod's volume was unpublished).
    pub stop: watch::Sender<bool>,
    /// Why the instance ended, for clients still connected (see proxy).
    pub end_note: watch::Sender<Option<String>>,
    /// Set once the instance is wiped and its slot is free.
    pub wiped: watch::Sender<bool>,
    /// The build slot, held from spawn until the wipe is done.
    slot: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

impl Instance {
    pub fn new(ctx: &Ctx, client: &Client, slot: OwnedSemaphorePermit) -> Arc<Instance> {
        Self::build(ctx, Some(client), slot)
    }

    /// A warm instance: started ahead, with no client until one claims it.
    pub fn new_warm(ctx: &Ctx, slot: OwnedSemaphorePermit) -> Arc<Instance> {
        Self::build(ctx, None, slot)
    }

    fn build(ctx: &Ctx, client: Option<&Client>, slot: OwnedSemaphorePermit) -> Arc<Instance> {
        let id = crate::sys::random_id();
        let warm = client.is_none();
        let client =
            client.cloned().unwrap_or_else(|| Client { key: format!("warm={id}"), display: "warm (unclaimed)".into() });
        Arc::new(Instance {
            dir: ctx.instances_dir().join(&id),
            id,
            client: std::sync::RwLock::new(client),
            warm,
            claimed: watch::Sender::new(!warm),
            phase: watch::Sender::new(Phase::Starting),
            conns: watch::Sender::new(0),
            created: Instant::now(),
            slot: std::sync::Mutex::new(Some(slot)),
            stop: watch::Sender::new(false),
            wiped: watch::Sender::new(false),
            end_note: watch::Sender::new(None),
        })
    }

    pub fn client(&self) -> Client {
        self.client.read().expect("client lock").clone()
    }

    /// Hands a warm instance to its client; false if it was already taken.
    pub fn claim(&self, client: &Client) -> bool {
        if *self.claimed.borrow() {
            return false;
        }
        *self.client.write().expect("client lock") = client.clone();
        self.claimed.send_replace(true);
        // Let another agent find the client's instance from files too.
        if let Ok(mut spec) = berth_shim::spec::Spec::load(&self.dir) {
            spec.client = client.display.clone();
            spec.client_key = client.key.clone();
            let _ = spec.store();
        }
        true
    }

    /// Waits (bounded) for the reason the instance ended, if it is ending.
    pub async fn wait_end_note(&self, timeout: std::time::Duration) -> Option<String> {
        let mut rx = self.end_note.subscribe();
        let got = tokio::time::timeout(timeout, rx.wait_for(|n| n.is_some())).await;
        got.ok().and_then(|r| r.ok().and_then(|n| n.clone()))
    }

    pub fn socket(&self) -> PathBuf {
        berth_shim::spec::socket_path(&self.dir)
    }
}

/// Runs the instance's life in a tracked task.
pub fn launch(ctx: Arc<Ctx>, inst: Arc<Instance>) {
    let span = tracing::info_span!(parent: None, "instance", instance = %inst.id, warm = inst.warm);
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
    let key = inst.client().key;
    if reg.get(&key).is_some_and(|i| Arc::ptr_eq(i, inst)) {
        reg.remove(&key);
    }
    drop(reg);
    crate::warm::forget(ctx, inst);
    true
}

async fn life(ctx: Arc<Ctx>, inst: Arc<Instance>) {
    ctx.metrics.instances_active.inc();
    let reason = run_life(&ctx, &inst).await;
    ctx.metrics.instances_active.dec();
    ctx.metrics.ended(reason);
    ctx.metrics.build_seconds.observe(inst.created.elapsed().as_secs_f64());
    // The slot frees only now, after the shim's outcome: the instance's
    // processes, cgroup and ids are gone and its state has left every path
    // an instance can reach (moved to the trash, whose bytes the shim is
    // removing as we speak).
    inst.slot.lock().expect("slot lock").take();
    inst.wiped.send_replace(true);
    crate::warm::refill(&ctx);
}

async fn run_life(ctx: &Arc<Ctx>, inst: &Arc<Instance>) -> &'static str {
    let (ctx, inst) = (ctx.clone(), inst.clone());
    let mut shim = match spawn::start(&ctx, &inst).await {
        Ok(shim) => shim,
        Err(e) => {
            warn!(error = %e, "instance could not be created");
            if !inst.warm {
                crate::admit::remember_failure(&ctx, &inst.client(), &e);
            }
            unregister(&ctx, &inst, true);
            inst.phase.send_replace(Phase::Failed(e));
            return "error";
        }
    };
    match spawn::wait_ready(&ctx, &inst, &mut shim).await {
        Ok(()) => {
            info!(start_ms = inst.created.elapsed().as_millis() as u64, client = %inst.client().display, "instance ready");
            if !inst.warm {
                ctx.metrics.start_seconds.observe(inst.created.elapsed().as_secs_f64());
            }
            inst.phase.send_replace(Phase::Ready);
        }
        Err((e, outcome)) => {
            if !inst.warm {
                crate::admit::remember_failure(&ctx, &inst.client(), &e);
            }
            unregister(&ctx, &inst, true);
            inst.phase.send_replace(Phase::Failed(e.clone()));
            if inst.warm {
                crate::warm::failed(&ctx);
            }
            return reap::record(&ctx, &inst, EndCause::StartFailed(e.to_string()), outcome.as_ref());
        }
    }
    // A warm instance waits for its client; the pool's leftovers end when
    // the agent starts draining.
    let unclaimed_end = match crate::warm::wait_claim(&ctx, &inst, &mut shim).await {
        crate::warm::Wait::Claimed => None,
        crate::warm::Wait::Drained => Some(EndCause::Drain),
        crate::warm::Wait::Died => Some(EndCause::DaemonExited),
    };
    if let Some(cause) = unclaimed_end {
        inst.phase.send_replace(Phase::Ended);
        let outcome = shim.stop(&ctx).await;
        return reap::record(&ctx, &inst, cause, outcome.as_ref());
    }
    let scope_idle = match ctx.run.scope {
        Scope::Client => ctx.run.idle_timeout,
        Scope::Connection => std::time::Duration::ZERO,
    };
    tokio::spawn(reap::watch_limits(ctx.clone(), inst.clone()));
    let cause = reap::serve_until_end(&ctx, &inst, &mut shim, scope_idle).await;
    inst.phase.send_replace(Phase::Ended);
    let outcome = shim.stop(&ctx).await;
    reap::record(&ctx, &inst, cause, outcome.as_ref())
}
