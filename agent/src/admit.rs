//! Admission: which instance serves a connection. Connections of one client
//! share an instance (client scope) or each get their own (connection scope);
//! a connection that arrives while its instance starts is held, not refused,
//! and served as soon as the instance is ready.
#![forbid(unsafe_code)]

use crate::instance::{Instance, Phase};
use crate::Ctx;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AdmitError {
    #[error("instance {id} for {client} failed to start: {reason}; daemon stderr: {tail}")]
    StartFailed {
        id: String,
        client: String,
        reason: String,
        tail: String,
    },
    #[error(
        "instance {id} did not answer on its socket within {timeout:?}; daemon stderr: {tail}"
    )]
    NotReady {
        id: String,
        timeout: Duration,
        tail: String,
    },
    #[error("instance {id} ended before this connection could be served; retry")]
    Gone { id: String },
    #[error("node {0} is draining and takes no new builds; retry on another node")]
    Draining(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("internal error: {0}")]
    Internal(String),
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
        self.instance
            .conns
            .send_modify(|c| *c = c.saturating_sub(1));
    }
}

/// Finds or starts the client's instance, counts the connection on it, and
/// waits until the instance is ready (or has failed).
pub async fn admit(ctx: &Arc<Ctx>, client: &Client) -> Result<ConnGuard, AdmitError> {
    let instance = attach(ctx, client)?;
    let guard = ConnGuard { instance };
    let mut phase = guard.instance.phase.subscribe();
    loop {
        let now = phase.borrow_and_update().clone();
        match now {
            Phase::Ready => return Ok(guard),
            Phase::Failed(e) => return Err(e),
            Phase::Ended => {
                return Err(AdmitError::Gone {
                    id: guard.instance.id.clone(),
                })
            }
            Phase::Starting => {}
        }
        if phase.changed().await.is_err() {
            return Err(AdmitError::Gone {
                id: guard.instance.id.clone(),
            });
        }
    }
}

/// Finds or creates the client's instance and counts one more connection.
fn attach(ctx: &Arc<Ctx>, client: &Client) -> Result<Arc<Instance>, AdmitError> {
    let draining = *ctx.draining.borrow();
    {
        let mut reg = ctx.registry.lock().expect("registry lock");
        let existing = reg.get(&client.key).cloned();
        let instance = match existing {
            Some(i) => i,
            None => {
                if draining {
                    return Err(AdmitError::Draining(ctx.node_name.clone()));
                }
                let i = Instance::new(ctx, client);
                reg.insert(client.key.clone(), i.clone());
                crate::instance::launch(ctx.clone(), i.clone());
                i
            }
        };
        // Counted under the registry lock, so the reaper, which checks the
        // count under the same lock, never ends an instance we just joined.
        instance.conns.send_modify(|c| *c += 1);
        Ok(instance)
    }
}
