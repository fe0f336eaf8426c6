//! Per-client bounds: no client can exhaust the agent for the others
//! (invariant 6). A client holds at most `--max-client-connections`
//! connections, whatever stage they are in (queued, starting, proxied); the
//! clients waiting in the admission queue hold at most
//! `--max-queued-connections` together; and the agent raises its own
//! descriptor limit at start, so the caps, not the kernel, say no first.
//! A proxied connection holds two sockets, and pipes only while bytes flow
//! (proxy/splice.rs: one up, two down): at most eight descriptors each, so
//! one client's share is 8 x `--max-client-connections`.
//!
//! The counts live in one table keyed like instances (the client key), and
//! each connection holds a ticket that gives its count back when dropped, so
//! a connection that ends any way at all (refused, hung up, proxied to the
//! end, task cancelled) is uncounted exactly once.

use crate::client::Client;
use crate::error::AdmitError;
use crate::Ctx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tracing::{info, warn};

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    /// Connections open, all stages.
    open: usize,
}

/// Connection counts per client key.
#[derive(Debug, Default)]
pub struct Bounds {
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    clients: HashMap<String, Counts>,
    /// Connections waiting in the queue, all clients.
    queued_conns: usize,
}

impl Bounds {
    /// Open connections of `key` (for logs and tests).
    pub fn open_of(&self, key: &str) -> usize {
        self.table.lock().expect("bounds").clients.get(key).map_or(0, |c| c.open)
    }

    /// One connection of `key` fewer; a client without any is forgotten.
    fn close(&self, key: &str) {
        let mut t = self.table.lock().expect("bounds");
        if let Some(c) = t.clients.get_mut(key) {
            c.open = c.open.saturating_sub(1);
            if c.open == 0 {
                t.clients.remove(key);
            }
        }
    }
}

/// One open connection of a client; dropping it gives the count back.
pub struct ConnTicket {
    ctx: Arc<Ctx>,
    key: String,
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        self.ctx.bounds.close(&self.key);
    }
}

/// Counts a new connection of `client`, or refuses it when the client
/// already holds `--max-client-connections`. Its other connections are
/// untouched.
pub fn open(ctx: &Arc<Ctx>, client: &Client) -> Result<ConnTicket, AdmitError> {
    let cap = ctx.run.max_client_connections;
    let mut t = ctx.bounds.table.lock().expect("bounds");
    let c = t.clients.entry(client.key.clone()).or_default();
    if c.open >= cap {
        return Err(AdmitError::Exhausted(format!(
            "client {} already has {}/{cap} connections open to node {} (--max-client-connections {cap}); \
             close idle connections or raise the cap",
            client.display, c.open, ctx.node_name
        )));
    }
    c.open += 1;
    Ok(ConnTicket { ctx: ctx.clone(), key: client.key.clone() })
}

/// A connection waiting in the admission queue; dropping it leaves.
pub struct QueueTicket {
    ctx: Arc<Ctx>,
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        let mut t = self.ctx.bounds.table.lock().expect("bounds");
        t.queued_conns = t.queued_conns.saturating_sub(1);
    }
}

/// Counts a connection that is about to wait in the admission queue, or
/// refuses it when the queued clients hold `--max-queued-connections`
/// already (`--queue-size` bounds the queue's length, queue.rs). The error
/// says why, for the queue's RESOURCE_EXHAUSTED message.
pub fn enter_queue(ctx: &Arc<Ctx>, client: &Client) -> Result<QueueTicket, String> {
    let cap = ctx.run.max_queued_connections;
    let mut t = ctx.bounds.table.lock().expect("bounds");
    if t.queued_conns >= cap {
        return Err(format!(
            "the queued clients hold {}/{cap} connections (--max-queued-connections {cap}); {} waits with {} open",
            t.queued_conns,
            client.display,
            t.clients.get(&client.key).map_or(0, |c| c.open)
        ));
    }
    t.queued_conns += 1;
    Ok(QueueTicket { ctx: ctx.clone() })
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit and logs both: the
/// caps above bound what a client can take, and the rest of the hard limit
/// is there to be used. Returns (soft, hard) after the change.
pub fn raise_nofile() -> Option<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot read RLIMIT_NOFILE");
            return None;
        }
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            warn!(soft, hard, error = %e, "cannot raise RLIMIT_NOFILE's soft limit to the hard limit");
            return Some((soft, hard));
        }
    }
    info!(soft_was = soft, soft = hard, hard, "descriptor limit (RLIMIT_NOFILE)");
    Some((hard, hard))
}
