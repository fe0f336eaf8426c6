//! kubelet's side of berth's CSI node plugin, for the suites that play it:
//! the CSI requests kubelet sends for an ephemeral inline volume, and its
//! plugin watcher.
//!
//! The watcher stands in for kubelet's, for the registration suite. It
//! behaves as kubelet's does (pkg/kubelet/pluginmanager/pluginwatcher/
//! plugin_watcher.go and reconciler/reconciler.go): inotify on the
//! plugins_registry dir; a created or moved-in socket whose name does not
//! start with '.' is a plugin to register (GetInfo, validate, then
//! NotifyRegistrationStatus); a deleted one is deregistered. Renames away from
//! a name (fsnotify's Rename) are ignored, as kubelet ignores them.
//!
//! Hand-written rather than a crate: no crate plays kubelet's side of this
//! API; the inotify part is nix's.

use crate::grpc::try_channel;
use berth_agent::proto::csi_v1::{volume_capability, VolumeCapability};
use berth_agent::proto::pluginregistration::registration_client::RegistrationClient;
use berth_agent::proto::pluginregistration::{InfoRequest, PluginInfo, RegistrationStatus};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A mount-mode, single-node-writer capability, as kubelet asks for an
/// ephemeral inline volume.
pub fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// The volume context kubelet sends with `podInfoOnMount` for an ephemeral
/// volume of pod `pod` (its uid is its name here) in namespace `ns`.
pub fn pod_ctx(pod: &str, ns: &str) -> HashMap<String, String> {
    [
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.name", pod),
        ("csi.storage.k8s.io/pod.namespace", ns),
        ("csi.storage.k8s.io/pod.uid", pod),
        ("csi.storage.k8s.io/serviceAccount.name", "default"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// What the watcher did, in order.
#[derive(Debug, Clone)]
pub enum Seen {
    /// GetInfo answered and kubelet's answer (`registered`) was sent.
    Registered { socket: PathBuf, ino: u64, info: PluginInfo, accepted: bool },
    /// The socket was removed: kubelet deregisters the driver.
    Deregistered { socket: PathBuf },
    /// A registration that could not be completed (GetInfo failed, bad info).
    Failed { socket: PathBuf, error: String },
}

pub struct PluginWatcher {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// kubelet's verdict for the next registrations.
    accept: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PluginWatcher {
    /// Watches `dir` (which must exist) and registers the sockets that are
    /// already there, as kubelet does at its start.
    pub fn start(dir: &Path, driver: &str) -> PluginWatcher {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).expect("inotify");
        let flags = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_DELETE;
        inotify.add_watch(dir, flags).unwrap_or_else(|e| panic!("watch {}: {e}", dir.display()));
        let mut w = PluginWatcher {
            seen: Arc::default(),
            accept: Arc::new(AtomicBool::new(true)),
            stop: Arc::default(),
            thread: None,
        };
        let (seen, accept, stop) = (w.seen.clone(), w.accept.clone(), w.stop.clone());
        let (dir, driver) = (dir.to_path_buf(), driver.to_string());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                rt.block_on(created(&e.path(), &driver, &accept, &seen));
            }
            while !stop.load(Ordering::SeqCst) {
                let events = match inotify.read_events() {
                    Ok(ev) => ev,
                    Err(nix::errno::Errno::EAGAIN) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(e) => panic!("inotify read: {e}"),
                };
                for ev in events {
                    let Some(name) = ev.name else { continue };
                    let path = dir.join(&name);
                    if ev.mask.contains(AddWatchFlags::IN_DELETE) {
                        if !name.to_string_lossy().starts_with('.') {
                            seen.lock().unwrap().push(Seen::Deregistered { socket: path });
                        }
                    } else {
                        rt.block_on(created(&path, &driver, &accept, &seen));
                    }
                }
            }
        });
        w.thread = Some(thread);
        w
    }

    /// kubelet's answer from now on: registered or refused.
    pub fn set_accept(&self, yes: bool) {
        self.accept.store(yes, Ordering::SeqCst);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits for the n-th registration (counting from 1) and returns it.
    pub fn wait_registration(&self, n: usize, timeout: Duration) -> Option<Seen> {
        self.wait(timeout, |s| s.iter().filter(|e| matches!(e, Seen::Registered { .. })).nth(n - 1).cloned())
    }

    /// Waits until `pred` finds something in what was seen so far.
    pub fn wait<T>(&self, timeout: Duration, pred: impl Fn(&[Seen]) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = pred(&self.seen()) {
                return Some(t);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PluginWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// kubelet's handling of a created socket: ignore dot names and non-sockets,
/// then GetInfo, validate, NotifyRegistrationStatus.
async fn created(path: &Path, driver: &str, accept: &AtomicBool, seen: &Mutex<Vec<Seen>>) {
    if path.file_name().is_none_or(|n| n.to_string_lossy().starts_with('.')) {
        return;
    }
    let Ok(meta) = std::fs::symlink_metadata(path) else { return };
    if !meta.file_type().is_socket() {
        return;
    }
    let fail = |error: String| seen.lock().unwrap().push(Seen::Failed { socket: path.to_path_buf(), error });
    let channel = match try_channel(path).await {
        Ok(c) => c,
        Err(e) => return fail(format!("dial: {e}")),
    };
    let mut client = RegistrationClient::new(channel);
    let info = match client.get_info(InfoRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(e) => return fail(format!("GetInfo: {e}")),
    };
    // kubelet's CSI handler: the type picks the handler, the versions must
    // include one it speaks, the name is the driver's.
    let valid = info.r#type == "CSIPlugin"
        && info.name == driver
        && info.supported_versions.iter().any(|v| v.starts_with("1."))
        && !info.endpoint.is_empty();
    if !valid {
        return fail(format!("invalid plugin info: {info:?}"));
    }
    let accepted = accept.load(Ordering::SeqCst);
    let status = RegistrationStatus {
        plugin_registered: accepted,
        error: if accepted { String::new() } else { "kubelet double: registration refused on purpose".into() },
    };
    if let Err(e) = client.notify_registration_status(status).await {
        return fail(format!("NotifyRegistrationStatus: {e}"));
    }
    seen.lock().unwrap().push(Seen::Registered { socket: path.to_path_buf(), ino: meta.ino(), info, accepted });
}
