//! The warm pool: `--warm N` keeps N fresh, never-used instances started
//! ahead, so a new client skips the daemon's start. A client claims one at
//! once and a replacement starts in the background. Each warm instance holds
//! a build slot (the pool counts inside the slots), serves exactly one client
//! once claimed, and is wiped like any other; unclaimed ones end on drain.
#![forbid(unsafe_code)]

use crate::admit::Client;
use crate::instance::{self, Instance, Phase};
use crate::Ctx;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// After a warm instance fails to start, the pool waits this long before
/// trying again, so a broken daemon does not spin.
const FAILURE_BACKOFF: Duration = Duration::from_secs(5);

/// Starts warm instances until the pool is full, a slot is missing, a
/// client is queued (it has the first claim on a freed slot), or the agent
/// drains.
pub fn refill(ctx: &Arc<Ctx>) {
    if ctx.run.warm == 0 || *ctx.draining.borrow() {
        return;
    }
    if ctx.warm_backoff.lock().expect("backoff").is_some_and(|until| Instant::now() < until) {
        return;
    }
    loop {
        if ctx.warm.lock().expect("warm").len() >= ctx.run.warm
            || ctx.queued.load(std::sync::atomic::Ordering::SeqCst) > 0
        {
            return;
        }
        // A fair semaphore hands no permit here while anyone waits.
        let Ok(slot) = ctx.slots.clone().try_acquire_owned() else { return };
        let inst = Instance::new_warm(ctx, slot);
        ctx.warm.lock().expect("warm").push_back(inst.clone());
        instance::launch(ctx.clone(), inst);
    }
}

/// Takes a warm instance for `client`, if one is there and not failed.
/// Called with the registry lock held, so one client claims one instance.
pub fn claim(ctx: &Ctx, client: &Client) -> Option<Arc<Instance>> {
    let mut pool = ctx.warm.lock().expect("warm");
    while let Some(inst) = pool.pop_front() {
        if matches!(&*inst.phase.borrow(), Phase::Failed(_) | Phase::Ended) {
            continue;
        }
        if inst.claim(client) {
            info!(instance = %inst.id, client = %client.display, "claimed a warm instance");
            return Some(inst);
        }
    }
    None
}

/// Drops an instance from the pool (it failed or ended unclaimed).
pub fn forget(ctx: &Ctx, inst: &Arc<Instance>) {
    ctx.warm.lock().expect("warm").retain(|i| !Arc::ptr_eq(i, inst));
}

/// A warm start failed: back off, then try again.
pub fn failed(ctx: &Arc<Ctx>) {
    warn!("a warm instance failed to start; the pool retries in {FAILURE_BACKOFF:?}");
    *ctx.warm_backoff.lock().expect("backoff") = Some(Instant::now() + FAILURE_BACKOFF);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(FAILURE_BACKOFF).await;
        *ctx.warm_backoff.lock().expect("backoff") = None;
        refill(&ctx);
    });
}

/// How a warm instance's wait for a client ended.
pub enum Wait {
    /// A client claimed it (or it was never warm): serve.
    Claimed,
    /// The agent drains: end it.
    Drained,
    /// Its daemon died while waiting: end it.
    Died,
}

/// For a warm instance, waits until a client claims it, the agent drains,
/// or its daemon dies. Other instances are claimed from the start.
pub async fn wait_claim(ctx: &Arc<Ctx>, inst: &Arc<Instance>, shim: &mut crate::reap::Shim) -> Wait {
    if !inst.warm {
        return Wait::Claimed;
    }
    let mut claimed = inst.claimed.subscribe();
    let mut draining = ctx.draining.subscribe();
    let outcome = tokio::select! {
        _ = crate::raised(&mut claimed) => return Wait::Claimed,
        _ = crate::raised(&mut draining) => Wait::Drained,
        _ = shim.ended() => Wait::Died,
    };
    // Take it out of the pool under the registry lock, which claims hold
    // too: a claim that got there first wins and the client is served.
    let _reg = ctx.registry.lock().expect("registry");
    let none = Client { key: format!("unclaimed={}", inst.id), display: "none (ended unclaimed)".into() };
    if inst.claim(&none) {
        forget(ctx, inst);
        outcome
    } else {
        Wait::Claimed
    }
}
