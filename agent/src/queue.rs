//! The queue for a build slot: a client without an instance takes a free
//! slot or waits for one, first come first served (tokio's semaphore is
//! fair), bounded in length and in time, and leaves at once when it hangs
//! up. Kept apart from admission so its order can be tested without a
//! socket.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How often a queued client is checked for having hung up.
pub const HANGUP_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, PartialEq, Eq)]
pub enum QueueError {
    /// `size` clients wait already.
    Full,
    /// Waited `timeout` without a slot.
    TimedOut(Duration),
    /// The semaphore was closed (the agent stops).
    Closed,
    /// The client hung up while queued.
    ClientGone,
}

/// Takes a free slot, or queues for one. `queued` counts the waiting
/// clients (the queue depth gauge reads it); `hung_up` is polled every
/// `HANGUP_POLL` while waiting.
pub async fn take_slot<F, Fut>(
    slots: &Arc<Semaphore>,
    queued: &AtomicUsize,
    size: usize,
    timeout: Duration,
    mut hung_up: F,
) -> Result<OwnedSemaphorePermit, QueueError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if let Ok(p) = slots.clone().try_acquire_owned() {
        return Ok(p);
    }
    let ahead = queued.fetch_add(1, Ordering::SeqCst);
    let _queued = QueueGuard(queued);
    if ahead >= size {
        return Err(QueueError::Full);
    }
    tracing::debug!(position = ahead + 1, "queued for a build slot");
    let acquire = slots.clone().acquire_owned();
    tokio::pin!(acquire);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            p = &mut acquire => return p.map_err(|_| QueueError::Closed),
            _ = &mut deadline => return Err(QueueError::TimedOut(timeout)),
            _ = tokio::time::sleep(HANGUP_POLL) => {
                if hung_up().await {
                    return Err(QueueError::ClientGone);
                }
            }
        }
    }
}

struct QueueGuard<'a>(&'a AtomicUsize);

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
