//! One instance as the agent sees it: its id and dir, its client, and its
//! state in one `watch` of a `Phase` (see phase.rs), plus the count of its
//! connections and the flag that ends it now. Its life (spawn, serve, reap)
//! runs in `life`; who holds it is the `registry`'s business.

use crate::client::Client;
use crate::phase::Phase;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub struct Instance {
    pub id: String,
    pub dir: PathBuf,
    /// Started ahead for the warm pool, without a client.
    pub warm: bool,
    /// A warm sandbox (`--warm-stage sandbox`): its shim holds the child
    /// before exec, and the claim starts the daemon.
    pub held: bool,
    pub created: Instant,
    /// Who the instance serves: None while a warm instance is unclaimed.
    client: RwLock<Option<Client>>,
    pub phase: watch::Sender<Phase>,
    /// Active connections.
    pub conns: watch::Sender<usize>,
    /// Set to end the instance now (its pod's volume was unpublished).
    pub stop: watch::Sender<bool>,
    /// Disk hook: the instance filesystem's peak and fills, as sampled.
    pub disk: berth_shim::disk::Seen,
    /// Handoff hook (issue 15): the pod's listening socket, set before
    /// launch when the daemon accepts the pod's connections itself.
    pub listener: std::sync::OnceLock<Arc<std::os::fd::OwnedFd>>,
}

impl Instance {
    /// An instance for `client`, or a warm one (None) that a client claims
    /// later. Nothing runs yet: `life::launch` starts it.
    pub fn new(id: String, dir: PathBuf, client: Option<&Client>) -> Arc<Instance> {
        Self::build(id, dir, client, false)
    }

    /// A warm sandbox: made ahead up to the daemon's exec.
    pub fn sandbox(id: String, dir: PathBuf) -> Arc<Instance> {
        Self::build(id, dir, None, true)
    }

    fn build(id: String, dir: PathBuf, client: Option<&Client>, held: bool) -> Arc<Instance> {
        Arc::new(Instance {
            id,
            dir,
            warm: client.is_none(),
            held,
            created: Instant::now(),
            client: RwLock::new(client.cloned()),
            phase: watch::Sender::new(Phase::Starting),
            conns: watch::Sender::new(0),
            stop: watch::Sender::new(false),
            disk: Default::default(),
            listener: Default::default(),
        })
    }

    pub fn client(&self) -> Client {
        let c = self.client.read().expect("client lock").clone();
        c.unwrap_or_else(|| Client::new(format!("warm={}", self.id), "warm (unclaimed)"))
    }

    pub fn is_claimed(&self) -> bool {
        self.client.read().expect("client lock").is_some()
    }

    /// Hands a warm instance to its client; false if it was already taken
    /// (or retired). A claim of an idle warm instance makes it `Ready` (a
    /// held sandbox: `Starting`, its daemon starts now); one still starting
    /// becomes `Ready` when its daemon answers. The phase's lock orders this
    /// against `mark_ready` and `mark_held`.
    pub fn claim(&self, client: &Client) -> bool {
        self.take(client, true)
    }

    /// Records a warm instance's claim in its spec, so that another agent
    /// finds the client's instance from files too. Called by the instance's
    /// life after the claim (a sandbox's after its go), not by the claim:
    /// a file read and write are no part of the start a client waits for.
    pub fn record_claim(&self) {
        let client = self.client();
        if let Ok(mut spec) = berth_shim::spec::Spec::load(&self.dir) {
            spec.client = client.display.clone();
            spec.client_key = client.key.clone();
            // A sandbox claimed by a pod's socket: its daemon serves the
            // pod's listener (recorded as for any fd-passed instance).
            spec.listen_fd = self.listener.get().is_some();
            if let Err(e) = spec.store() {
                tracing::warn!(instance = %self.id, error = %e, "could not record the claim in the spec");
            }
        }
    }

    /// Marks an unclaimed warm instance as ending unclaimed; false if a
    /// client claimed it first (then it serves that client).
    pub fn retire(&self) -> bool {
        self.take(&Client::new(format!("unclaimed={}", self.id), "none (ended unclaimed)"), false)
    }

    fn take(&self, client: &Client, serve: bool) -> bool {
        let mut won = false;
        self.phase.send_if_modified(|p| {
            let mut c = self.client.write().expect("client lock");
            if c.is_some() {
                return false;
            }
            *c = Some(client.clone());
            won = true;
            if serve && matches!(p, Phase::WarmIdle) {
                *p = if self.held { Phase::Starting } else { Phase::Ready };
                return true;
            }
            false
        });
        won
    }

    /// The daemon answers: `Ready` for a client, `WarmIdle` for the pool.
    pub fn mark_ready(&self) {
        self.phase.send_modify(|p| {
            *p = if self.is_claimed() { Phase::Ready } else { Phase::WarmIdle };
        });
    }

    /// A sandbox is made and held: `WarmIdle` for the pool; one claimed
    /// while it was made stays `Starting` (its daemon starts now).
    pub fn mark_held(&self) {
        self.phase.send_if_modified(|p| match self.is_claimed() {
            true => false,
            false => {
                *p = Phase::WarmIdle;
                true
            }
        });
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.send_replace(p);
    }

    /// Records why an ending instance ended, for clients still connected.
    pub fn set_end_note(&self, why: String) {
        self.phase.send_if_modified(|p| match p {
            Phase::Ending { note } => {
                *note = Some(why);
                true
            }
            _ => false,
        });
    }

    /// The last step of the life: wiped, slot free.
    pub fn mark_wiped(&self) {
        self.phase.send_modify(|p| {
            *p = match std::mem::replace(p, Phase::Starting) {
                Phase::Ending { note } => Phase::Wiped { note, failure: None },
                Phase::Failed(e) => Phase::Wiped { note: None, failure: Some(e) },
                w @ Phase::Wiped { .. } => w,
                _ => Phase::Wiped { note: None, failure: None },
            }
        });
    }

    /// Resolves once the instance is wiped.
    pub async fn wiped(&self) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(Phase::is_wiped).await.map(|_| ());
    }

    /// Waits (bounded) for the reason the instance ended, if it is ending.
    pub async fn wait_end_note(&self, timeout: Duration) -> Option<String> {
        let mut rx = self.phase.subscribe();
        let got = tokio::time::timeout(timeout, rx.wait_for(|p| p.end_note().is_some() || p.is_wiped())).await;
        got.ok().and_then(|r| r.ok().and_then(|p| p.end_note().map(str::to_string)))
    }

    pub fn socket(&self) -> PathBuf {
        berth_shim::spec::socket_path(&self.dir)
    }
}
