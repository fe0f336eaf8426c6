//! Pod sockets handed to the daemon itself (issue 15): on a CSI pod's socket
//! the agent admits, then steps out of the data path.
//!
//! The agent binds and owns the pod's listener, as on the proxy path. While
//! the pod has no instance it watches the listener for readability without
//! accepting (a connection waiting in the backlog). Then admission as
//! everywhere: a slot, the queue (the connection waits in the backlog), or a
//! refusal, which the agent answers by accepting that one connection and
//! writing the usual gRPC error on it. An admitted pod's instance starts
//! with the listener as the daemon's fd 3 (`--addr fd://`, socket
//! activation, through the shim: see `spawn` and the shim's `run`); from then
//! on the daemon accepts the pod's connections and no byte of them crosses
//! the agent. The daemon also serves its instance socket, which readiness
//! probes as before.
//!
//! Idle reaping counts the daemon's connections on the listener with
//! sock_diag (see [`diag`]), in the agent's network namespace and in the
//! pod's own, where the kernel puts a pod's accepted connections (see
//! [`netns`]), and feeds the count to the instance's connection count, which
//! the reaper watches as for proxied connections. When the instance is
//! wiped the agent watches the listener again.
//!
//! A warm sandbox (`--warm-stage sandbox`) serves a pod's socket: its
//! daemon has not exec'd, so the pod's listener goes to it with the go
//! (SCM_RIGHTS on the shim's lifeline, then on the handshake to the held
//! child) and the daemon starts on it as a cold one would.
//!
//! A warm daemon (`--warm-stage daemon`) does not (docs/compatibility.md,
//! "Warm pool and pod sockets"): a daemon takes its activation fds only at
//! start, so a warm one would have to be started on a listener of its own
//! and that listener moved onto the pod's path at claim (rename(2) does that
//! atomically). But the claim happens at the pod's first connection, which
//! is then already queued on the pod's own listener, and a queued connection
//! cannot move to another listener: the agent would have to accept it and
//! proxy it for its whole life, and for `buildctl build` that one connection
//! is the whole build. Claiming at NodePublishVolume instead (before any
//! connection) would hold a slot from volume setup until the pod's first
//! build, with no way to tell "not connected yet" from "done" for the idle
//! timeout. So without a sandbox, a pod's instance starts here, with the
//! pod's listener.

pub mod diag;
pub mod netns;

use crate::client::Client;
use crate::error::AdmitError;
use crate::instance::Instance;
use crate::phase::Phase;
use crate::registry::Attach;
use crate::Ctx;
use diag::SocketFile;
use netns::{CountError, Counter};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

/// How often a running fd-passed instance's connections are counted. The
/// idle timeout starts at the first count of zero, so this adds at most one
/// period to it.
pub const COUNT_EVERY: Duration = Duration::from_millis(250);

/// Serves a pod's socket on the fd path until `stop` fires (unpublish) or
/// the agent shuts down. `listener` is bound at `path`.
pub async fn serve(ctx: Arc<Ctx>, listener: UnixListener, path: PathBuf, client: Client, stop: CancellationToken) {
    let file = match listener.set_nonblocking(true).and_then(|()| SocketFile::of(&path)) {
        Ok(f) => f,
        Err(e) => {
            warn!(socket = %path.display(), error = %e, "cannot watch the pod's socket");
            return;
        }
    };
    let fd = Arc::new(OwnedFd::from(listener));
    // `with_interest` is deprecated for types whose raw fd may change or
    // close under the registration; an `Arc<OwnedFd>` held by the AsyncFd
    // itself can do neither, and its unsafe successor is barred here.
    #[allow(deprecated)]
    let watch = match AsyncFd::with_interest(fd.clone(), Interest::READABLE) {
        Ok(w) => w,
        Err(e) => {
            warn!(socket = %path.display(), error = %e, "cannot watch the pod's socket");
            return;
        }
    };
    let mut shutdown = ctx.shutdown.subscribe();
    info!(socket = %path.display(), client = %client.display, "listening (connections handed to the daemon)");
    loop {
        // A connection waits in the backlog: readable, nothing accepted.
        tokio::select! {
            r = watch.readable() => match r {
                Ok(mut guard) => {
                    if !pending(fd.as_fd()) {
                        // Woken for nothing (the last daemon took them all).
                        guard.clear_ready();
                        continue;
                    }
                }
                Err(e) => {
                    warn!(socket = %path.display(), error = %e, "watching the pod's socket failed");
                    return;
                }
            },
            _ = crate::raised(&mut shutdown) => return,
            _ = stop.cancelled() => return,
        }
        let admitted = tokio::select! {
            a = admit(&ctx, &client, &fd, file) => a,
            _ = crate::raised(&mut shutdown) => return,
            _ = stop.cancelled() => return,
        };
        match admitted {
            Ok(inst) => {
                // The daemon accepts from here on; the agent waits for the
                // instance's end to watch again.
                tokio::select! {
                    _ = inst.wiped() => debug!(instance = %inst.id, "pod's instance wiped; watching its socket again"),
                    _ = crate::raised(&mut shutdown) => return,
                    _ = stop.cancelled() => return,
                }
            }
            Err(e) => refuse_one(&ctx, &fd, e).await,
        }
    }
}

/// True when a connection waits in the listener's backlog.
fn pending(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut p = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut p, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Accepts ONE waiting connection and answers it with the refusal, as the
/// proxy path does (refuse.rs). The next waiting one, if any, goes through
/// admission again.
async fn refuse_one(ctx: &Arc<Ctx>, fd: &Arc<OwnedFd>, e: AdmitError) {
    ctx.metrics.refused(e.metric_label());
    warn!(error = %e, "connection refused");
    let accepted = fd
        .try_clone()
        .map(UnixListener::from)
        .and_then(|l| l.accept())
        .and_then(|(s, _)| s.set_nonblocking(true).map(|()| s))
        .and_then(tokio::net::UnixStream::from_std);
    match accepted {
        // Its own task: a client that never reads must not hold up the socket.
        Ok(stream) => {
            tokio::spawn(crate::refuse::refuse(stream, e.to_status()).in_current_span());
        }
        Err(err) => {
            // EAGAIN: the client gave up already. Anything else: back off.
            debug!(error = %err, "no connection to refuse");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Admission for a pod whose connection waits in the backlog: its running
/// instance, or a new one on a free or queued-for slot, started with the
/// listener. Every error is the refusal to answer.
async fn admit(
    ctx: &Arc<Ctx>,
    client: &Client,
    fd: &Arc<OwnedFd>,
    file: SocketFile,
) -> Result<Arc<Instance>, AdmitError> {
    if let Some(inst) = ctx.registry.get(&client.key) {
        return Ok(inst);
    }
    if *ctx.draining.borrow() {
        return Err(AdmitError::Draining(ctx.node_name.clone()));
    }
    if let Some(e) = ctx.registry.recent_failure(client) {
        return Err(e);
    }
    crate::disk::admit(ctx)?;
    // A held warm sandbox takes the pod's listener with its go (its slot
    // is the pool's); the pool makes a replacement once its daemon answers.
    if let Some(inst) = ctx.registry.claim_sandbox(client, fd) {
        let span = tracing::info_span!(parent: None, "handoff", instance = %inst.id);
        tokio::spawn(count_conns(ctx.clone(), inst.clone(), fd.clone(), file).instrument(span));
        info!(instance = %inst.id, client = %client.display, "pod's socket handed to a warm sandbox");
        return Ok(inst);
    }
    // A daemon-stage warm instance never serves a pod socket (see above),
    // but the unclaimed ones hold slots: one gives its slot up when none is
    // free.
    if ctx.slots.available_permits() == 0 {
        if let Some(warm) = ctx.registry.retire_one_warm() {
            info!(instance = %warm.id, client = %client.display, "an unclaimed warm instance ends to free a slot for a pod socket");
            warm.stop.send_replace(true);
        }
    }
    // A client that gives up while queued cannot be seen without accepting:
    // its connection stays in the backlog and the queue timeout bounds it.
    let permit = crate::admit::wait_slot_with(ctx, client, || async { false }).await?;
    let draining = *ctx.draining.borrow();
    let new = || {
        let inst = crate::life::new_instance(ctx, Some(client));
        let _ = inst.listener.set(fd.clone());
        inst
    };
    match ctx.registry.attach(client, draining, Some(new)) {
        Attach::Created(inst) => {
            // attach counted one connection: it stands for the one in the
            // backlog until the first count replaces it.
            crate::life::launch(ctx.clone(), inst.clone(), permit);
            let span = tracing::info_span!(parent: None, "handoff", instance = %inst.id);
            tokio::spawn(count_conns(ctx.clone(), inst.clone(), fd.clone(), file).instrument(span));
            info!(instance = %inst.id, client = %client.display, "pod's socket handed to its instance");
            Ok(inst)
        }
        // Another path got there first (the slot goes back to the queue).
        Attach::Joined(inst) | Attach::Claimed(inst) => {
            inst.conns.send_modify(|c| *c = c.saturating_sub(1));
            Ok(inst)
        }
        Attach::Draining => Err(AdmitError::Draining(ctx.node_name.clone())),
        Attach::Empty => Err(AdmitError::Gone { id: "none".into() }),
    }
}

/// Keeps the instance's connection count at what the daemon holds on the
/// pod's listener, from readiness to the end; the reaper does the rest.
///
/// A count that fails is counted on /metrics (`handoff_count_failures`, by
/// reason) and makes the instance count as in use: the agent cannot tell a
/// live build from an idle one then, and reaping a live build is the worse
/// mistake. The instance still ends when its pod goes (unpublish), when its
/// daemon exits, and at drain; `handoff_uncounted_instances` says how many
/// are held that way.
async fn count_conns(ctx: Arc<Ctx>, inst: Arc<Instance>, fd: Arc<OwnedFd>, file: SocketFile) {
    let mut phase = inst.phase.subscribe();
    if phase.wait_for(|p| !matches!(p, Phase::Starting)).await.is_err() {
        return;
    }
    let proc_root = ctx.run.host.proc_root.clone();
    let mut counter: Option<Counter> = None;
    let mut last_err = None;
    let mut namespaces = 0;
    // Set while the last count failed; dropping it takes the instance off
    // the uncounted gauge (also when this task ends).
    let mut uncounted: Option<Uncounted> = None;
    loop {
        if inst.phase.borrow().is_over() {
            return;
        }
        let (dir, fd2, root) = (inst.dir.clone(), fd.clone(), proc_root.clone());
        let kept = counter.take();
        let counted = tokio::task::spawn_blocking(move || {
            let mut c = match kept {
                Some(c) => c,
                None => match Counter::new(fd2.as_fd(), file, &dir, &root) {
                    Ok(c) => c,
                    Err(e) => return (None, Err(e)),
                },
            };
            let n = c.count();
            (Some(c), n)
        })
        .await
        .unwrap_or_else(|e| (None, Err(CountError::Task(e.to_string()))));
        match counted {
            (c, Ok(n)) => {
                counter = c;
                last_err = None;
                uncounted = None;
                let found = counter.as_ref().map_or(0, Counter::foreign_namespaces);
                if found > namespaces {
                    info!(instance = %inst.id, namespaces = found, "pod's connections counted in its own network namespace");
                }
                namespaces = found;
                inst.conns.send_if_modified(|c| std::mem::replace(c, n) != n);
            }
            (c, Err(e)) => {
                counter = c;
                ctx.metrics.handoff_count_failed(e.metric_label());
                uncounted.get_or_insert_with(|| Uncounted::new(&ctx));
                // Counting fails: the instance counts as in use (never reap
                // a build because the kernel would not answer); unpublish
                // still ends it.
                let text = e.to_string();
                if last_err.as_ref() != Some(&text) {
                    warn!(instance = %inst.id, reason = e.metric_label(), error = %text, "cannot count the pod's connections (sock_diag); the instance is kept until its pod's volume is unpublished");
                }
                last_err = Some(text);
                inst.conns.send_if_modified(|c| {
                    let idle = *c == 0;
                    *c = (*c).max(1);
                    idle
                });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(COUNT_EVERY) => {}
            _ = phase.wait_for(|p| p.is_over()) => return,
        }
    }
}

/// One instance on the `handoff_uncounted_instances` gauge while alive.
struct Uncounted(Arc<Ctx>);

impl Uncounted {
    fn new(ctx: &Arc<Ctx>) -> Uncounted {
        ctx.metrics.handoff_uncounted.inc();
        Uncounted(ctx.clone())
    }
}

impl Drop for Uncounted {
    fn drop(&mut self) {
        self.0.metrics.handoff_uncounted.dec();
    }
}
