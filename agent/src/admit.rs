//! Admission: which instance serves a connection. Connections of one client
//! share an instance (client scope) or each get their own (connection scope);
//! a connection that arrives while its instance starts is held, not refused,
//! and served as soon as the instance is ready.

use crate::client::Client;
use crate::error::AdmitError;
use crate::instance::Instance;
use crate::phase::Phase;
use crate::queue::{self, QueueError};
use crate::registry::Attach;
use crate::Ctx;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::OwnedSemaphorePermit;

/// A connection's hold on its instance; the instance counts it as active
/// until this is dropped.
pub struct ConnGuard {
    pub instance: Arc<Instance>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.instance.conns.send_modify(|c| *c = c.saturating_sub(1));
    }
}

/// Finds or starts the client's instance, counts the connection on it, and
/// waits until the instance is ready (or has failed). A client without an
/// instance first needs a build slot, and may wait for one in the queue.
pub async fn admit(ctx: &Arc<Ctx>, client: &Client, stream: &UnixStream) -> Result<ConnGuard, AdmitError> {
    let instance = match attach(ctx, client, None)? {
        Some(i) => i,
        None => {
            if let Some(e) = ctx.registry.recent_failure(client) {
                return Err(e);
            }
            // Disk hook: no new instance while the state dir's disk is low.
            crate::disk::admit(ctx)?;
            let permit = wait_slot(ctx, client, stream).await?;
            attach(ctx, client, Some(permit))?.expect("attach with a permit always yields an instance")
        }
    };
    let guard = ConnGuard { instance };
    let mut phase = guard.instance.phase.subscribe();
    loop {
        let now = phase.borrow_and_update().clone();
        match now {
            Phase::Ready => return Ok(guard),
            Phase::Failed(e) | Phase::Wiped { failure: Some(e), .. } => return Err(e),
            Phase::Ending { .. } | Phase::Wiped { .. } => {
                return Err(AdmitError::Gone { id: guard.instance.id.clone() })
            }
            Phase::Starting | Phase::WarmIdle => {}
        }
        if phase.changed().await.is_err() {
            return Err(AdmitError::Gone { id: guard.instance.id.clone() });
        }
    }
}

/// Finds the client's instance, or creates it when given a slot, and counts
/// one more connection on it. Without a slot and without an instance: None.
/// A slot given but not used (another connection of the same client got
/// there first) is dropped: it goes to the next in the queue.
fn attach(
    ctx: &Arc<Ctx>,
    client: &Client,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<Option<Arc<Instance>>, AdmitError> {
    let draining = *ctx.draining.borrow();
    let new = permit.is_some().then(|| || crate::life::new_instance(ctx, Some(client)));
    match ctx.registry.attach(client, draining, new) {
        Attach::Joined(i) => Ok(Some(i)),
        Attach::Claimed(i) => {
            // The replacement starts in the background; a sandbox's once
            // its daemon answers (life.rs), so that making it never competes
            // with the start this client waits for.
            if !i.held {
                crate::warm::refill(ctx);
            }
            Ok(Some(i))
        }
        Attach::Created(i) => {
            crate::life::launch(ctx.clone(), i.clone(), permit.expect("created with a slot"));
            Ok(Some(i))
        }
        Attach::Empty => Ok(None),
        Attach::Draining => Err(AdmitError::Draining(ctx.node_name.clone())),
    }
}

/// Takes a free slot, or queues for one (see queue.rs).
async fn wait_slot(ctx: &Arc<Ctx>, client: &Client, stream: &UnixStream) -> Result<OwnedSemaphorePermit, AdmitError> {
    wait_slot_with(ctx, client, || hung_up(stream)).await
}

/// [`wait_slot`] with the queue's hang-up check given (issue 15: a pod
/// socket handed to the daemon has no accepted stream to watch).
pub(crate) async fn wait_slot_with<F, Fut>(
    ctx: &Arc<Ctx>,
    client: &Client,
    hung_up: F,
) -> Result<OwnedSemaphorePermit, AdmitError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if *ctx.draining.borrow() {
        return Err(AdmitError::Draining(ctx.node_name.clone()));
    }
    let (size, timeout) = (ctx.run.queue_size, ctx.run.queue_timeout);
    let n = ctx.slots_total;
    let full = |what: String| AdmitError::Exhausted(format!("node {}: {n}/{n} builds running, {what}", ctx.node_name));
    if let Ok(p) = ctx.slots.clone().try_acquire_owned() {
        return Ok(p);
    }
    // Hook (bounds): the connections queued clients hold are capped.
    let _held = crate::bounds::enter_queue(ctx, client).map_err(full)?;
    match queue::take_slot(&ctx.slots, &ctx.queued, size, timeout, hung_up).await {
        Ok(p) => Ok(p),
        Err(QueueError::Full) => Err(full("queue full".into())),
        Err(QueueError::TimedOut(t)) => Err(full(format!("timed out after {t:?} in the queue"))),
        Err(QueueError::Closed) => Err(AdmitError::Draining(ctx.node_name.clone())),
        Err(QueueError::ClientGone) => Err(AdmitError::ClientGone),
    }
}

/// True once the peer has shut down its side (EPOLLRDHUP), even when bytes
/// it sent before hanging up are still unread.
async fn hung_up(stream: &UnixStream) -> bool {
    match tokio::time::timeout(Duration::ZERO, stream.ready(Interest::READABLE)).await {
        Ok(Ok(r)) => r.is_read_closed(),
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}
