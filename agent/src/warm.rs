//! The warm pool: `--warm N` keeps N fresh, never-used instances started
//! ahead, so a new client skips the daemon's start. A client claims one at
//! once (`Registry::attach`) and a replacement starts in the background.
//!
//! How far ahead is `--warm-stage`: `daemon` (running and answering) or
//! `sandbox` (made up to the daemon's exec, see `spawn::held`; the claim
//! execs a fresh daemon, a pod's socket can claim one too, and its
//! replacement starts `life::REFILL_AFTER_READY` after that daemon answers).
//! Each warm instance holds a build slot (the pool counts inside the slots),
//! serves exactly one client once claimed, and is wiped like any other;
//! unclaimed ones end on drain (`life`).
//!
//! An instance's life asks for a refill after its wipe through
//! `Ctx::warm_wanted` rather than by calling here, so that the pool may
//! launch instances without the two modules importing each other.

use crate::Ctx;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Starts warm instances until the pool is full, a slot is missing, a
/// client is queued (it has the first claim on a freed slot), the pool
/// rests after a failed start, or the agent drains.
pub fn refill(ctx: &Arc<Ctx>) {
    if ctx.run.warm == 0 || *ctx.draining.borrow() || ctx.registry.warm_resting().is_some() {
        return;
    }
    loop {
        if ctx.registry.warm_len() >= ctx.run.warm || ctx.queued.load(Ordering::SeqCst) > 0 {
            return;
        }
        // Disk hook: no new instance while the state dir's disk is low.
        if crate::disk::admit(ctx).is_err() {
            return;
        }
        // A fair semaphore hands no permit here while anyone waits.
        let Ok(slot) = ctx.slots.clone().try_acquire_owned() else { return };
        let inst = crate::life::new_instance(ctx, None);
        ctx.registry.add_warm(inst.clone());
        crate::life::launch(ctx.clone(), inst, slot);
    }
}

/// Refills the pool at start and whenever an instance's life asks
/// (`warm_wanted`), and again when a rest after a failed start is over.
/// Ends when the agent drains.
pub async fn keep_filled(ctx: Arc<Ctx>) {
    let mut draining = ctx.draining.subscribe();
    loop {
        refill(&ctx);
        let rest = ctx.registry.warm_resting();
        let rested = async {
            match rest {
                Some(until) => tokio::time::sleep_until(until).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctx.warm_wanted.notified() => {}
            _ = rested => {}
            _ = crate::raised(&mut draining) => return,
        }
    }
}
