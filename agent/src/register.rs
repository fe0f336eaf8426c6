//! Registration with kubelet: the agent serves kubelet's plugin registration
//! API (`pluginregistration.v1`) itself, on `<registration-dir>/<driver>-reg.sock`,
//! in place of a node-driver-registrar sidecar.
//!
//! Why not the sidecar: it removes its registration socket on SIGTERM, so in a
//! surge rollout the old pod's registrar deleted the socket the new pod's had
//! just created, and kubelet deregistered the driver (new CI pods on the node
//! could not mount their berth volume until something re-registered). Here the
//! socket follows the rule of every berth socket: a new agent replaces the file
//! atomically (`listen::bind_replacing` binds under a dot name and renames
//! it over the path), and an exiting agent removes it only while the inode is still its own.
//!
//! What kubelet does (pkg/kubelet/pluginmanager/pluginwatcher/plugin_watcher.go
//! and reconciler/reconciler.go): its watcher takes an inotify create (or
//! moved-to) of a socket whose name does not start with '.' as a plugin to
//! register, and a delete as one to deregister. It calls `GetInfo`, validates
//! the answer (type `CSIPlugin`, a supported version), registers the driver
//! with the endpoint we name, then calls `NotifyRegistrationStatus`. A socket
//! re-created at the same path is registered again, which is how a refused
//! registration is retried.

use crate::proto::pluginregistration::registration_server::{Registration, RegistrationServer};
use crate::proto::pluginregistration::{InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse};
use crate::{listen, Ctx};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

/// What kubelet calls a CSI driver's registration.
pub const PLUGIN_TYPE: &str = "CSIPlugin";
/// The CSI spec versions the node plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];
/// First wait before a refused registration is offered again; doubles up to MAX.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often an absent registration dir is looked for again.
const DIR_POLL: Duration = Duration::from_secs(2);
/// How long a stopping server waits for kubelet's open calls.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Where registration with kubelet stands; `/readyz` and the
/// `berth_kubelet_registered` gauge are read off it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kubelet {
    /// No `--registration-dir`: nothing to wait for.
    Off,
    /// Socket offered (or not yet possible); kubelet has not acknowledged it.
    Waiting(String),
    /// kubelet said `plugin_registered: true`.
    Registered,
    /// kubelet said `plugin_registered: false`, with its error.
    Refused(String),
}

impl Kubelet {
    /// Why the agent is not ready, from registration's point of view.
    pub fn not_ready(&self) -> Option<String> {
        match self {
            Kubelet::Off | Kubelet::Registered => None,
            Kubelet::Waiting(why) => Some(format!("kubelet has not registered the CSI driver yet: {why}")),
            Kubelet::Refused(e) => Some(format!("kubelet refused the CSI driver registration: {e}")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("--registration-dir {0} needs --csi-endpoint: kubelet is told the CSI endpoint to call")]
    NoEndpoint(PathBuf),
}

impl RegisterError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            RegisterError::NoEndpoint(_) => "no_endpoint",
        }
    }
}

/// The registration socket kubelet's watcher looks for.
pub fn socket_path(dir: &Path, driver: &str) -> PathBuf {
    dir.join(format!("{driver}-reg.sock"))
}

/// Checks the flags at start; the task itself never fails.
pub fn validate(run: &crate::config::RunArgs) -> Result<(), RegisterError> {
    match (&run.registration_dir, &run.csi_endpoint) {
        (Some(dir), None) => Err(RegisterError::NoEndpoint(dir.clone())),
        _ => Ok(()),
    }
}

/// Sets the state, logs and counts each change.
fn set(ctx: &Ctx, next: Kubelet) {
    let changed = ctx.kubelet.send_if_modified(|now| {
        if *now == next {
            return false;
        }
        *now = next.clone();
        true
    });
    if !changed {
        return;
    }
    ctx.metrics.kubelet_registered.set(i64::from(next == Kubelet::Registered));
    match &next {
        Kubelet::Registered => info!(registered = true, "kubelet registered the CSI driver"),
        Kubelet::Refused(e) => {
            warn!(registered = false, kubelet_error = %e, "kubelet refused the CSI driver registration")
        }
        Kubelet::Waiting(why) => {
            info!(registered = false, reason = %why, "waiting for kubelet to register the CSI driver")
        }
        Kubelet::Off => {}
    }
}

/// The service kubelet calls on the registration socket.
struct Service {
    driver: String,
    endpoint: String,
    notices: mpsc::UnboundedSender<RegistrationStatus>,
}

#[tonic::async_trait]
impl Registration for Service {
    async fn get_info(&self, _req: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        info!(driver = %self.driver, endpoint = %self.endpoint, "kubelet asked for the plugin info");
        Ok(Response::new(PluginInfo {
            r#type: PLUGIN_TYPE.into(),
            name: self.driver.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        req: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let _ = self.notices.send(req.into_inner());
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// Starts the registration task when `--registration-dir` is set. Await the
/// handle after shutdown: the task removes its socket (if still ours) last.
pub fn spawn(ctx: &Arc<Ctx>) -> Option<tokio::task::JoinHandle<()>> {
    let dir = ctx.run.registration_dir.clone()?;
    let endpoint = ctx.run.csi_endpoint.clone()?;
    set(ctx, Kubelet::Waiting("starting".into()));
    Some(tokio::spawn(run(ctx.clone(), dir, endpoint)))
}

/// Why one round of serving the socket ended.
enum Round {
    Shutdown,
    Refused,
}

async fn run(ctx: Arc<Ctx>, dir: PathBuf, endpoint: PathBuf) {
    let sock = socket_path(&dir, &ctx.run.csi_driver_name);
    let mut shutdown = ctx.shutdown.subscribe();
    let mut backoff = RETRY_FIRST;
    let mut said_absent = false;
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !dir.is_dir() {
            if !said_absent {
                warn!(
                    dir = %dir.display(),
                    "kubelet's plugin registration dir does not exist: kubelet is not watching there (check \
                     --registration-dir and kubelet's --root-dir), so the CSI driver is not registered and pods \
                     cannot mount berth volumes on this node; builds on the node socket are served as usual; \
                     registering as soon as the dir appears"
                );
                said_absent = true;
            }
            set(&ctx, Kubelet::Waiting(format!("registration dir {} does not exist", dir.display())));
            if sleep_or_shutdown(&mut shutdown, DIR_POLL).await {
                return;
            }
            continue;
        }
        said_absent = false;
        let listener = match listen::bind_replacing(&sock, 0o600) {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, retry_in = ?backoff, "cannot offer the registration socket to kubelet");
                set(&ctx, Kubelet::Waiting(e.to_string()));
                if sleep_or_shutdown(&mut shutdown, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(RETRY_MAX);
                continue;
            }
        };
        let ino = listen::inode(&sock);
        if !matches!(*ctx.kubelet.borrow(), Kubelet::Registered) {
            set(&ctx, Kubelet::Waiting(format!("socket {} offered", sock.display())));
        }
        info!(socket = %sock.display(), endpoint = %endpoint.display(), "registration socket offered to kubelet");
        let round = serve_round(&ctx, listener, &endpoint, &mut backoff).await;
        // Ours to remove only while no newer agent has replaced it.
        if listen::inode(&sock) == ino {
            if let Err(e) = std::fs::remove_file(&sock) {
                warn!(socket = %sock.display(), error = %e, "cannot remove the registration socket");
            }
        }
        match round {
            Round::Shutdown => return,
            Round::Refused => {
                info!(retry_in = ?backoff, "offering the registration socket again");
                if sleep_or_shutdown(&mut shutdown, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Serves the registration socket until shutdown, or until kubelet refuses
/// the registration. A successful one resets the retry backoff.
async fn serve_round(
    ctx: &Arc<Ctx>,
    listener: tokio::net::UnixListener,
    endpoint: &Path,
    backoff: &mut Duration,
) -> Round {
    let (tx, mut notices) = mpsc::unbounded_channel();
    let svc =
        Service { driver: ctx.run.csi_driver_name.clone(), endpoint: endpoint.display().to_string(), notices: tx };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(RegistrationServer::new(svc)).serve_with_incoming_shutdown(
            incoming,
            async move {
                let _ = stop_rx.await;
            },
        ),
    );
    let mut shutdown = ctx.shutdown.subscribe();
    let round = loop {
        tokio::select! {
            n = notices.recv() => match n {
                Some(s) if s.plugin_registered => {
                    set(ctx, Kubelet::Registered);
                    *backoff = RETRY_FIRST;
                }
                Some(s) => {
                    let e = if s.error.is_empty() { "no reason given".to_string() } else { s.error };
                    set(ctx, Kubelet::Refused(e));
                    break Round::Refused;
                }
                None => break Round::Shutdown,
            },
            _ = crate::raised(&mut shutdown) => break Round::Shutdown,
        }
    };
    let _ = stop_tx.send(());
    if tokio::time::timeout(STOP_GRACE, server).await.is_err() {
        warn!("registration server did not stop within {STOP_GRACE:?}");
    }
    round
}

/// Sleeps, or returns true at once when the agent shuts down.
async fn sleep_or_shutdown(shutdown: &mut tokio::sync::watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = crate::raised(shutdown) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_named_after_the_driver_in_the_registry_dir() {
        assert_eq!(
            socket_path(Path::new("/var/lib/kubelet/plugins_registry"), "berth.dev"),
            PathBuf::from("/var/lib/kubelet/plugins_registry/berth.dev-reg.sock")
        );
    }

    #[test]
    fn readiness_waits_for_kubelets_yes() {
        assert_eq!(Kubelet::Off.not_ready(), None);
        assert_eq!(Kubelet::Registered.not_ready(), None);
        let w = Kubelet::Waiting("socket offered".into()).not_ready().unwrap();
        assert!(w.contains("not registered") && w.contains("socket offered"), "{w}");
        let r = Kubelet::Refused("version 0.3.0 not supported".into()).not_ready().unwrap();
        assert!(r.contains("refused") && r.contains("0.3.0"), "{r}");
    }
}
