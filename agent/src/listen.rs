//! Listening: bind the node sockets, accept clients, tell who they are
//! (SO_PEERCRED plus the peer's cgroup), and hand each connection to
//! admission and then to the proxy.

pub mod peer;

use crate::admit::admit;
use crate::client::Client;
use crate::config::Scope;
use crate::error::AdmitError;
use crate::{proxy, refuse, sys, Ctx};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Binds a unix socket at `path` with `mode`, replacing a stale or older
/// agent's socket file.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, ListenError> {
    let io_err = |source| ListenError::Io { path: path.to_path_buf(), source };
    if replaceable(path)? {
        std::fs::remove_file(path).map_err(io_err)?;
    }
    let l = UnixListener::bind(path).map_err(io_err)?;
    sys::chmod(path, mode).map_err(io_err)?;
    Ok(l)
}

/// Like [`bind`], but the path never goes missing: the socket is bound under
/// a dot name beside it, given its mode, then renamed over it. For kubelet's
/// plugin watcher, which ignores dot names and deregisters a plugin whose
/// socket is deleted: it sees only the new socket arrive. (Not used for the
/// build sockets: `/proc/net/unix` and `ss -x` show a socket by the name it
/// was bound under, which would then be the dot name.)
pub fn bind_replacing(path: &Path, mode: u32) -> Result<UnixListener, ListenError> {
    let io_err = |source| ListenError::Io { path: path.to_path_buf(), source };
    let Some(parent) = path.parent() else {
        return Err(io_err(io::Error::from(io::ErrorKind::InvalidInput)));
    };
    replaceable(path)?;
    // Short (socket paths are limited to 107 bytes) and unique per bind.
    static BINDS: AtomicU64 = AtomicU64::new(0);
    let tmp = parent.join(format!(".b{}-{}", std::process::id(), BINDS.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(io_err)?;
    if let Err(e) = sys::chmod(&tmp, mode).and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(e));
    }
    Ok(l)
}

/// Creates the socket's dir; true when a socket file is in the way (ours to
/// replace), an error when anything else is.
fn replaceable(path: &Path) -> Result<bool, ListenError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ListenError::Io { path: path.to_path_buf(), source })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => Ok(true),
        Ok(_) => Err(ListenError::NotASocket { path: path.to_path_buf() }),
        Err(_) => Ok(false),
    }
}

/// The inode of a socket file, to tell our socket from a newer agent's.
pub fn inode(path: &Path) -> Option<u64> {
    std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(path).ok()?).into()
}

/// Who the connections of a listener belong to.
#[derive(Debug, Clone)]
pub enum Source {
    /// The shared node socket: identify each peer by its credentials.
    Node,
    /// A pod's own CSI socket: every connection is that pod's.
    Pod(Client),
}

/// Accepts until the agent drains or `stop` fires. Each connection runs in
/// its own task, so a slow or hostile client never holds up the others.
pub async fn serve(ctx: Arc<Ctx>, listener: UnixListener, path: PathBuf, source: Source, stop: CancellationToken) {
    // Draining keeps accepting: running clients' new connections are still
    // served, and new clients get a clear "draining" refusal.
    let mut shutdown = ctx.shutdown.subscribe();
    info!(socket = %path.display(), "listening");
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, _)) => {
                    let ctx = ctx.clone();
                    let source = source.clone();
                    tokio::spawn(async move { handle(ctx, stream, source).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    warn!(socket = %path.display(), error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = crate::raised(&mut shutdown) => break,
            _ = stop.cancelled() => break,
        }
    }
    debug!(socket = %path.display(), "listener closed");
}

static CONN_SEQ: AtomicU64 = AtomicU64::new(0);

async fn handle(ctx: Arc<Ctx>, stream: UnixStream, source: Source) {
    let client = match source {
        Source::Node => identify(&ctx, &stream),
        Source::Pod(c) => c,
    };
    let span = tracing::info_span!(parent: None, "conn", client = %client.display);
    async move {
        // Per-client connection cap (bounds); the ticket lives as long as the connection.
        // The stages' futures are boxed: a task is as large as its largest
        // state, and a flood of refused connections should not each carry
        // the proxy's and admission's state.
        let admitted = match crate::bounds::open(&ctx, &client) {
            Ok(ticket) => Box::pin(admit(&ctx, &client, &stream)).await.map(|g| (g, ticket)),
            Err(e) => Err(e),
        };
        match admitted {
            Ok((guard, _ticket)) => {
                let inst = guard.instance.clone();
                let span = tracing::info_span!("proxy", instance = %inst.id);
                match Box::pin(proxy::pipe(stream, &inst).instrument(span)).await {
                    Ok((up, down)) => {
                        ctx.metrics.proxied(up, down);
                        debug!(instance = %inst.id, up, down, "connection closed")
                    }
                    Err(e) => {
                        debug!(instance = %inst.id, error = %e, "connection ended with an error")
                    }
                }
                drop(guard);
            }
            Err(AdmitError::ClientGone) => {
                ctx.metrics.refused("client_gone");
                debug!("client hung up while queued");
            }
            Err(e) => {
                ctx.metrics.refused(e.metric_label());
                warn!(error = %e, "connection refused");
                Box::pin(refuse::refuse(stream, e.to_status())).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Who the peer is (see [`peer`]). In client scope the key is the peer's
/// uid, gid and cgroup (its container, on a Kubernetes node), or its mount
/// namespace when its pid is hidden, so every process of one CI job reaches
/// the same instance; a peer that cannot be told apart from others, and
/// every connection in connection scope, is a client of its own.
fn identify(ctx: &Ctx, stream: &UnixStream) -> Client {
    let seq = CONN_SEQ.fetch_add(1, Ordering::Relaxed);
    let peer = peer::identify(stream, &ctx.run.host.proc_root);
    match (ctx.run.scope, peer.key()) {
        (Scope::Client, Some(key)) => Client::new(key, peer.display()),
        _ => Client::of_connection(seq, peer.display()),
    }
}
