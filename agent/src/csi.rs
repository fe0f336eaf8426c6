//! The CSI node plugin: CI pods reach berth without hostPath, through a CSI
//! ephemeral inline volume. Publishing a volume creates a per-pod socket dir
//! on the host, listens there for that pod only, and bind-mounts the dir (not
//! the socket, so a restarted agent can listen again under the same mount)
//! onto kubelet's target path. The pod's instance starts at its first
//! connection and is reaped when idle, and always at unpublish.

pub mod controller;
pub mod identity;
pub mod node;
pub mod target;

use crate::client::Client;
use crate::listen::{self, Source};
use crate::{sys, Ctx};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use target::Pod;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The record of one published volume, `<run-dir>/volumes/<volume>.json`:
/// enough to listen again after a restart, or to clean up. It lives outside
/// the mounted socket dir, so the pod sees nothing but its socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub volume_id: String,
    pub target_path: PathBuf,
    pub pod: Pod,
}

pub const SOCKET: &str = "buildkitd.sock";
/// How long unpublish waits for the pod's instance to be wiped.
const WIPE_WAIT: Duration = Duration::from_secs(90);

impl Publication {
    /// All connections on the pod's socket are this client: the pod.
    pub fn client(&self) -> Client {
        Client {
            key: format!("pod={} volume={}", self.pod.uid, self.volume_id),
            display: format!(
                "pod={}/{} uid={} sa={}",
                self.pod.namespace, self.pod.name, self.pod.uid, self.pod.service_account
            ),
            pod: Some(crate::client::PodRef {
                namespace: self.pod.namespace.clone(),
                name: self.pod.name.clone(),
                uid: self.pod.uid.clone(),
            }),
        }
    }
}

struct Live {
    publication: Publication,
    listener: CancellationToken,
}

/// The plugin's state: live publications and a lock per volume, so that
/// concurrent publish/unpublish calls for one volume run one at a time.
pub struct Csi {
    pub ctx: Arc<Ctx>,
    live: Mutex<HashMap<String, Live>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Csi {
    pub fn new(ctx: Arc<Ctx>) -> Arc<Csi> {
        Arc::new(Csi { ctx, live: Mutex::new(HashMap::new()), locks: Mutex::new(HashMap::new()) })
    }

    pub fn pods_dir(&self) -> PathBuf {
        self.ctx.run.run_dir.join("pods")
    }

    pub fn dir_of(&self, volume_id: &str) -> PathBuf {
        self.pods_dir().join(volume_id)
    }

    pub fn record_of(&self, volume_id: &str) -> PathBuf {
        self.ctx.run.run_dir.join("volumes").join(format!("{volume_id}.json"))
    }

    pub fn load_record(&self, volume_id: &str) -> Option<Publication> {
        std::fs::read(self.record_of(volume_id)).ok().and_then(|b| serde_json::from_slice(&b).ok())
    }

    fn lock_of(&self, volume_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().expect("locks").entry(volume_id.to_string()).or_default().clone()
    }

    fn published(&self, volume_id: &str) -> Option<Publication> {
        self.live.lock().expect("live").get(volume_id).map(|l| l.publication.clone())
    }

    fn count_in_namespace(&self, ns: &str) -> usize {
        self.live.lock().expect("live").values().filter(|l| l.publication.pod.namespace == ns).count()
    }

    /// Binds the pod's socket and serves it as that pod.
    fn listen(&self, p: &Publication) -> Result<CancellationToken, String> {
        let sock = self.dir_of(&p.volume_id).join(SOCKET);
        // Any uid in the pod may connect; only this pod sees the dir.
        let l = listen::bind(&sock, 0o666).map_err(|e| e.to_string())?;
        let token = CancellationToken::new();
        match self.ctx.run.pod_sockets {
            // Handoff hook (issue 15): the daemon accepts the pod's connections.
            crate::config::PodSockets::Handoff => match l.into_std() {
                Ok(l) => {
                    tokio::spawn(crate::handoff::serve(self.ctx.clone(), l, sock, p.client(), token.clone()));
                }
                Err(e) => return Err(format!("{}: {e}", sock.display())),
            },
            crate::config::PodSockets::Proxy => {
                tokio::spawn(listen::serve(self.ctx.clone(), l, sock, Source::Pod(p.client()), token.clone()));
            }
        }
        Ok(token)
    }

    fn insert(&self, p: Publication, listener: CancellationToken) {
        self.live.lock().expect("live").insert(p.volume_id.clone(), Live { publication: p, listener });
    }

    /// Ends the pod's instance, if it has one, and waits for its wipe. The
    /// instance may belong to another agent on the node (the old one during
    /// a rollout): then its shim is found from the instance files and told
    /// to stop, and the owner records the end.
    async fn end_instance(&self, p: &Publication) {
        let key = p.client().key;
        if let Some(inst) = self.ctx.registry.get(&key) {
            inst.stop.send_replace(true);
            if tokio::time::timeout(WIPE_WAIT, inst.wiped()).await.is_err() {
                warn!(instance = %inst.id, "instance not wiped within {WIPE_WAIT:?} of unpublish");
            }
        }
        for dir in crate::recover::instances_of(&self.ctx, &key) {
            let shim = berth_shim::spec::PidStamp::load(&dir.join(berth_shim::spec::SHIM_PID_FILE));
            if let Some(stamp) = shim.filter(|s| s.alive(&self.ctx.run.host.proc_root)) {
                info!(dir = %dir.display(), shim = stamp.pid, "stopping another agent's instance of an unpublished pod");
                let _ = sys::signal(stamp.pid as u32, nix::sys::signal::Signal::SIGTERM);
            }
            let deadline = tokio::time::Instant::now() + WIPE_WAIT;
            while dir.exists() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// True when `target` is a mount of the pod's own socket dir.
    pub fn mounted_here(&self, target: &Path, volume_id: &str) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(t), Ok(d)) = (std::fs::metadata(target), std::fs::metadata(self.dir_of(volume_id))) else {
            return false;
        };
        t.dev() == d.dev() && t.ino() == d.ino()
    }

    /// Re-creates listeners for the volumes published before a restart;
    /// a volume whose target is no longer mounted is wiped.
    pub fn recover(&self) {
        let mut known = std::collections::HashSet::new();
        if let Ok(rd) = std::fs::read_dir(self.ctx.run.run_dir.join("volumes")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let Some(vol) = name.strip_suffix(".json").filter(|v| target::volume_id(v).is_ok()) else { continue };
                match self.load_record(vol) {
                    Some(p) if self.mounted_here(&p.target_path, &p.volume_id) => match self.listen(&p) {
                        Ok(token) => {
                            info!(volume = %p.volume_id, pod = %p.client().display, "re-listening for a volume published before the restart");
                            known.insert(vol.to_string());
                            self.insert(p, token);
                        }
                        Err(e) => {
                            warn!(volume = %p.volume_id, error = %e, "cannot listen again for a published volume")
                        }
                    },
                    other => {
                        if let Some(p) = &other {
                            let _ = sys::unmount(&p.target_path);
                        }
                        info!(volume = vol, "wiping the socket dir of a volume that is gone");
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        // Socket dirs without a live record: a crash between mkdir and record.
        if let Ok(rd) = std::fs::read_dir(self.pods_dir()) {
            for e in rd.flatten() {
                if !known.contains(&*e.file_name().to_string_lossy()) {
                    if let Err(err) = std::fs::remove_dir_all(e.path()) {
                        warn!(dir = %e.path().display(), error = %err, "cannot remove stale pod socket dir");
                    }
                }
            }
        }
    }
}

/// Serves Identity, Node (and an empty Controller) on the CSI endpoint until the agent shuts down.
pub async fn serve(csi: Arc<Csi>, l: tokio::net::UnixListener, endpoint: PathBuf) -> Result<(), String> {
    use crate::proto::csi_v1::controller_server::ControllerServer;
    use crate::proto::csi_v1::identity_server::IdentityServer;
    use crate::proto::csi_v1::node_server::NodeServer;
    info!(endpoint = %endpoint.display(), driver = %csi.ctx.run.csi_driver_name, "serving CSI");
    let mut shutdown = csi.ctx.shutdown.subscribe();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(l);
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity::Identity(csi.clone())))
        .add_service(NodeServer::new(node::Node(csi.clone())))
        // Only ControllerGetCapabilities (empty), for generic CSI clients.
        .add_service(ControllerServer::new(controller::Controller))
        .serve_with_incoming_shutdown(incoming, async move { crate::raised(&mut shutdown).await })
        .await
        .map_err(|e| format!("CSI server on {}: {e}", endpoint.display()))
}
