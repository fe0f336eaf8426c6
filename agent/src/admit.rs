//! Admission: which instance serves a connection. Connections of one client
//! share an instance (client scope) or each get their own (connection scope);
//! a connection that arrives while its instance starts is held, not refused,
//! and served as soon as the instance is ready.
#![forbid(unsafe_code)]

use crate::instance::{Instance, Phase};
use crate::Ctx;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AdmitError {
    #[error("instance {id} for {client} failed to start: {reason}; daemon stderr: {tail}")]
    StartFailed { id: String, client: String, reason: String, tail: String },
    #[error("instance {id} did not answer on its socket within {timeout:?}; daemon stderr: {tail}")]
    NotReady { id: String, timeout: Duration, tail: String },
    #[error("instance {id} ended before this connection could be served; retry")]
    Gone { id: String },
    #[error("node {0} is draining and takes no new builds; retry on another node")]
    Draining(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The client hung up while queued; nobody to tell.
    #[error("the client hung up while queued")]
    ClientGone,
}

impl AdmitError {
    /// The bounded label for the refused-connections metric.
    pub fn label(&self) -> &'static str {
        match self {
            AdmitError::StartFailed { .. } | AdmitError::NotReady { .. } => "start_failed",
            AdmitError::Gone { .. } => "gone",
            AdmitError::Draining(_) => "draining",
            AdmitError::Exhausted(_) => "exhausted",
            AdmitError::Internal(_) => "internal",
            AdmitError::ClientGone => "client_gone",
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// What instances are keyed by: same key, same instance.
    pub key: String,
    /// For logs: uid, pid and cgroup of the peer.
    pub display: String,
}

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
            if let Some(e) = recent_failure(ctx, client) {
                return Err(e);
            }
            let permit = wait_slot(ctx, stream).await?;
            attach(ctx, client, Some(permit))?.expect("attach with a permit always yields an instance")
        }
    };
    let guard = ConnGuard { instance };
    let mut phase = guard.instance.phase.subscribe();
    loop {
        let now = phase.borrow_and_update().clone();
        match now {
            Phase::Ready => return Ok(guard),
            Phase::Failed(e) => return Err(e),
            Phase::Ended => return Err(AdmitError::Gone { id: guard.instance.id.clone() }),
            Phase::Starting => {}
        }
        if phase.changed().await.is_err() {
            return Err(AdmitError::Gone { id: guard.instance.id.clone() });
        }
    }
}

/// Finds the client's instance, or creates it when given a slot, and counts
/// one more connection on it. Without a slot and without an instance: None.
fn attach(
    ctx: &Arc<Ctx>,
    client: &Client,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<Option<Arc<Instance>>, AdmitError> {
    let draining = *ctx.draining.borrow();
    let mut reg = ctx.registry.lock().expect("registry lock");
    let instance = match (reg.get(&client.key).cloned(), permit) {
        // Another connection of the same client got there first; a slot we
        // waited for goes back (dropped) to the next in the queue.
        (Some(i), _) => i,
        (None, _) if draining => return Err(AdmitError::Draining(ctx.node_name.clone())),
        (None, None) => match crate::warm::claim(ctx, client) {
            Some(i) => {
                reg.insert(client.key.clone(), i.clone());
                i.conns.send_modify(|c| *c += 1);
                drop(reg);
                // The replacement starts in the background.
                crate::warm::refill(ctx);
                return Ok(Some(i));
            }
            None => return Ok(None),
        },
        (None, Some(permit)) => {
            let i = Instance::new(ctx, client, permit);
            reg.insert(client.key.clone(), i.clone());
            crate::instance::launch(ctx.clone(), i.clone());
            i
        }
    };
    // Counted under the registry lock, so the reaper, which checks the
    // count under the same lock, never ends an instance we just joined.
    instance.conns.send_modify(|c| *c += 1);
    Ok(Some(instance))
}

/// How often a queued client is checked for having hung up.
const HANGUP_POLL: Duration = Duration::from_millis(100);

/// Takes a free slot, or queues for one: FIFO (tokio's semaphore is fair),
/// bounded by `--queue-size` and `--queue-timeout`. A client that hangs up
/// while queued leaves the queue at once.
async fn wait_slot(ctx: &Arc<Ctx>, stream: &UnixStream) -> Result<OwnedSemaphorePermit, AdmitError> {
    if *ctx.draining.borrow() {
        return Err(AdmitError::Draining(ctx.node_name.clone()));
    }
    if let Ok(p) = ctx.slots.clone().try_acquire_owned() {
        return Ok(p);
    }
    let n = ctx.slots_total;
    let full = |what: String| AdmitError::Exhausted(format!("node {}: {n}/{n} builds running, {what}", ctx.node_name));
    let ahead = ctx.queued.fetch_add(1, Ordering::SeqCst);
    let _queued = QueueGuard(ctx.clone());
    if ahead >= ctx.run.queue_size {
        return Err(full("queue full".into()));
    }
    debug!(position = ahead + 1, "queued for a build slot");
    let acquire = ctx.slots.clone().acquire_owned();
    tokio::pin!(acquire);
    let deadline = tokio::time::sleep(ctx.run.queue_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            p = &mut acquire => return p.map_err(|_| AdmitError::Draining(ctx.node_name.clone())),
            _ = &mut deadline => return Err(full(format!("timed out after {:?} in the queue", ctx.run.queue_timeout))),
            _ = tokio::time::sleep(HANGUP_POLL) => {
                if hung_up(stream).await {
                    return Err(AdmitError::ClientGone);
                }
            }
        }
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

struct QueueGuard(Arc<Ctx>);

impl Drop for QueueGuard {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The client's last start failure, if it is younger than the backoff: a
/// daemon that failed a second ago will fail again, and clients that retry
/// in a loop (buildx's bootstrap polls for 20 s) should not start one
/// instance per retry.
fn recent_failure(ctx: &Ctx, client: &Client) -> Option<AdmitError> {
    let backoff = ctx.run.start_failure_backoff;
    let failures = ctx.failures.lock().expect("failures");
    let (at, e) = failures.get(&client.key)?;
    (at.elapsed() < backoff).then(|| e.clone())
}

/// Records a start failure for the backoff; forgets stale ones.
pub fn remember_failure(ctx: &Ctx, client: &Client, e: &AdmitError) {
    let backoff = ctx.run.start_failure_backoff;
    if backoff.is_zero() {
        return;
    }
    let mut failures = ctx.failures.lock().expect("failures");
    failures.retain(|_, (at, _)| at.elapsed() < backoff);
    failures.insert(client.key.clone(), (std::time::Instant::now(), e.clone()));
}
