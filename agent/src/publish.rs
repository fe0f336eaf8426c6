//! Capacity publishing: the node's build slots become a Node extended
//! resource (`status.capacity` and `status.allocatable["berth.dev/build"]`),
//! so build pods can request one slot and the scheduler and the cluster
//! autoscaler see where one is free. The Node also gets labels
//! (`berth.dev/agent-version`, `berth.dev/arch`) and annotations
//! (`berth.dev/slots`, `berth.dev/builds-in-use`, refreshed periodically).
//!
//! The publisher is a reconcile loop: it keeps what it last published and
//! patches again when the slot count changes (a `watch` channel), when the
//! builds in use change (sampled every `refresh`), and every `resync` (a
//! kubelet that re-registers its Node drops extended resources). The API
//! being down or refusing never blocks or stops the agent: every outcome is
//! one structured log line, transient failures (no connection, timeouts, 5xx,
//! 429) back off exponentially with jitter, other refusals (403, 404, 422)
//! are logged with the fix and retried at the backoff cap.

pub mod cluster;
mod retry;
#[cfg(test)]
mod tests;

use crate::config::RunArgs;
use crate::Ctx;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

pub use crate::config::resource::{parse_resource_name, DEFAULT_RESOURCE};
pub const LABEL_VERSION: &str = "berth.dev/agent-version";
pub const LABEL_ARCH: &str = "berth.dev/arch";
pub const ANNOTATION_SLOTS: &str = "berth.dev/slots";
pub const ANNOTATION_IN_USE: &str = "berth.dev/builds-in-use";
/// The well-known architecture label the kubelet sets.
pub const LABEL_K8S_ARCH: &str = "kubernetes.io/arch";
/// `fieldManager` of every patch (shows in managedFields).
pub const FIELD_MANAGER: &str = "berth-agent";
/// What RBAC the agent's ServiceAccount needs, for the log lines that say why a call was refused.
pub const RBAC_FIX: &str = "grant the agent's ServiceAccount a ClusterRole with verbs get,patch on resource nodes and patch on nodes/status (the chart's RBAC does this)";

pub use berth_shim::host::{go_arch, this_arch};
pub use retry::{classify, fix_for, Backoff, Class};

/// The JSON patch (RFC 6902) of the Node status subresource that sets the
/// extended resource's capacity and allocatable to `slots`. `add` on an
/// object member sets it whether or not it exists. The pointer tokens are
/// escaped by `jsonptr` (`/` in the resource name becomes `~1`).
pub fn status_patch(resource: &str, slots: u64) -> json_patch::Patch {
    use json_patch::{jsonptr::PointerBuf, AddOperation, Patch, PatchOperation};
    let quantity = Value::String(slots.to_string());
    let add = |field: &str| {
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["status", field, resource]),
            value: quantity.clone(),
        })
    };
    Patch(vec![add("capacity"), add("allocatable")])
}

/// The JSON merge patch (RFC 7386) of the Node's metadata.
pub fn metadata_patch(slots: u64, in_use: u64) -> Value {
    json!({
        "metadata": {
            "labels": {
                LABEL_VERSION: env!("CARGO_PKG_VERSION"),
                LABEL_ARCH: this_arch(),
            },
            "annotations": {
                ANNOTATION_SLOTS: slots.to_string(),
                ANNOTATION_IN_USE: in_use.to_string(),
            },
        }
    })
}

/// Tunables of the publisher; tests shorten the intervals.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub resource: String,
    /// First retry delay after a transient failure; doubles per failure.
    pub backoff_min: Duration,
    /// Most delay between retries, and the delay after a refusal (403, 404, ...).
    pub backoff_max: Duration,
    /// Spread retries over [d/2, d] so a fleet of agents does not retry in step.
    pub jitter: bool,
    /// How often the builds-in-use annotation is sampled (patched only on change).
    pub refresh: Duration,
    /// Everything is published again this often, changed or not.
    pub resync: Duration,
    /// Longest one API call may take.
    pub request_timeout: Duration,
}

impl Settings {
    pub fn new(node: impl Into<String>, resource: impl Into<String>) -> Self {
        Settings {
            node: node.into(),
            resource: resource.into(),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            jitter: true,
            refresh: Duration::from_secs(15),
            resync: Duration::from_secs(300),
            request_timeout: Duration::from_secs(30),
        }
    }

    /// What `run` publishes: the node from `--node-name`, else `env_node`
    /// (NODE_NAME); `Err` says why nothing is published.
    pub fn from_run(run: &RunArgs, env_node: Option<String>) -> Result<Settings, String> {
        let node = run.node_name.clone().or(env_node).filter(|n| !n.trim().is_empty());
        match (run.publish_capacity, node) {
            (Some(false), _) => Err("--publish-capacity=false".into()),
            (_, None) => Err("no --node-name and no NODE_NAME in the environment (the chart sets it from the downward API, fieldRef spec.nodeName)".into()),
            (_, Some(node)) => Ok(Settings::new(node, run.extended_resource_name.clone())),
        }
    }
}

/// What the publisher has done so far; tests and the agent can watch it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Slots last published to the Node status (None: not yet).
    pub slots: Option<u64>,
    /// Builds in use last published as an annotation.
    pub in_use: Option<u64>,
    /// Successful status patches.
    pub status_patches: u64,
    /// Successful metadata patches.
    pub metadata_patches: u64,
    /// Failed calls.
    pub failures: u64,
    pub last_error: Option<String>,
}

/// The error of one API call, with what it was.
#[derive(Debug)]
struct CallError {
    op: &'static str,
    error: kube::Error,
}

/// Publishes this node's slots; see the module docs.
pub struct Publisher {
    api: Api<Node>,
    settings: Settings,
    slots: watch::Receiver<u64>,
    in_use: Box<dyn Fn() -> u64 + Send + Sync>,
    progress: watch::Sender<Progress>,
}

impl Publisher {
    /// `slots`: the slot count, which may change; `in_use`: builds running now.
    pub fn new(
        client: Client,
        settings: Settings,
        slots: watch::Receiver<u64>,
        in_use: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        Publisher {
            api: Api::all(client),
            settings,
            slots,
            in_use: Box::new(in_use),
            progress: watch::Sender::new(Progress::default()),
        }
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    async fn call<F: Future<Output = Result<Node, kube::Error>>>(
        &self,
        op: &'static str,
        f: F,
    ) -> Result<(), CallError> {
        match tokio::time::timeout(self.settings.request_timeout, f).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(CallError { op, error }),
            Err(_) => Err(CallError {
                op,
                error: kube::Error::Service(format!("no answer within {:?}", self.settings.request_timeout).into()),
            }),
        }
    }

    async fn patch_status(&self, slots: u64) -> Result<(), CallError> {
        let patch = Patch::Json::<()>(status_patch(&self.settings.resource, slots));
        let pp = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        self.call("patch node status", self.api.patch_status(&self.settings.node, &pp, &patch)).await
    }

    async fn patch_metadata(&self, slots: u64, in_use: u64) -> Result<(), CallError> {
        let patch = Patch::Merge(metadata_patch(slots, in_use));
        let pp = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        self.call("patch node metadata", self.api.patch(&self.settings.node, &pp, &patch)).await
    }

    /// Runs until `shutdown` resolves. Never returns an error: failures are
    /// logged and retried.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let s = self.settings.clone();
        let mut backoff = Backoff::new(s.backoff_min, s.backoff_max, s.jitter);
        let mut status_done: Option<u64> = None;
        let mut meta_done: Option<(u64, u64)> = None;
        let mut next_resync = Instant::now() + s.resync;
        let mut slots_open = true;
        let mut attempt: u64 = 0;
        tokio::pin!(shutdown);
        loop {
            let slots = *self.slots.borrow_and_update();
            let in_use = (self.in_use)();
            if Instant::now() >= next_resync {
                status_done = None;
                meta_done = None;
            }
            let result: Result<(), CallError> = async {
                if status_done != Some(slots) {
                    self.patch_status(slots).await?;
                    status_done = Some(slots);
                    info!(node = %s.node, resource = %s.resource, slots, "published build slots as the node's extended resource (capacity and allocatable)");
                    self.progress.send_modify(|p| {
                        p.slots = Some(slots);
                        p.status_patches += 1;
                    });
                }
                if meta_done != Some((slots, in_use)) {
                    self.patch_metadata(slots, in_use).await?;
                    if meta_done.map(|m| m.0) != Some(slots) {
                        info!(node = %s.node, slots, in_use, version = env!("CARGO_PKG_VERSION"), arch = this_arch(), "published node labels and annotations");
                    } else {
                        debug!(node = %s.node, in_use, "published builds in use");
                    }
                    meta_done = Some((slots, in_use));
                    self.progress.send_modify(|p| {
                        p.in_use = Some(in_use);
                        p.metadata_patches += 1;
                    });
                }
                Ok(())
            }
            .await;
            let wait = match result {
                Ok(()) => {
                    if attempt > 0 {
                        info!(node = %s.node, failed_attempts = attempt, "Kubernetes API reachable again; node capacity is published");
                    }
                    attempt = 0;
                    backoff.reset();
                    if Instant::now() >= next_resync {
                        next_resync = Instant::now() + s.resync;
                    }
                    s.refresh.min(next_resync.saturating_duration_since(Instant::now()))
                }
                Err(CallError { op, error }) => {
                    attempt += 1;
                    let message = error.to_string();
                    self.progress.send_modify(|p| {
                        p.failures += 1;
                        p.last_error = Some(format!("{op}: {message}"));
                    });
                    match classify(&error) {
                        Class::Transient => {
                            let wait = backoff.next_delay();
                            let code = match &error {
                                kube::Error::Api(st) => Some(st.code),
                                _ => None,
                            };
                            warn!(node = %s.node, op, code, attempt, retry_in = ?wait, error = %message, "Kubernetes API unavailable; retrying");
                            wait
                        }
                        Class::Refused(code) => {
                            let wait = backoff.at_cap();
                            let fix = fix_for(code, &s.node, &s.resource);
                            error!(node = %s.node, op, code, attempt, retry_in = ?wait, error = %message, fix = %fix, "Kubernetes API refused the node update; retrying");
                            wait
                        }
                    }
                }
            };
            tokio::select! {
                _ = &mut shutdown => {
                    debug!(node = %s.node, "capacity publisher stopping");
                    return;
                }
                changed = self.slots.changed(), if slots_open => {
                    if changed.is_err() {
                        // The sender is gone: the count can no longer change.
                        slots_open = false;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// A client from the kubeconfig (KUBECONFIG, ~/.kube/config) or, in a pod,
/// the service account (token and CA); see [`client_from`].
pub async fn default_client(request_timeout: Duration) -> Result<Client, kube::Error> {
    let config = kube::Config::infer().await.map_err(kube::Error::InferConfig)?;
    client_from(config, request_timeout)
}

/// A client for `config` as berth uses it: timeouts, so a hung API server
/// cannot stall the publisher, and without kube's built-in retry of
/// 429/503/504 (up to 15 silent retries): the publisher retries itself,
/// with its own backoff and a log line per failure.
pub fn client_from(mut config: kube::Config, request_timeout: Duration) -> Result<Client, kube::Error> {
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(request_timeout);
    config.write_timeout = Some(request_timeout);
    config.default_retry = false;
    Client::try_from(config)
}

/// The running publisher of `run`: send a new count to publish it.
pub struct Handle {
    pub slots: watch::Sender<u64>,
    pub task: JoinHandle<()>,
}

/// Starts publishing for `run` when a node name is known and publishing is
/// not turned off (else one info line, and `None`). Never blocks: the client
/// is made in the task, which retries until the API is reachable and stops
/// when the agent shuts down.
pub fn spawn(ctx: &Arc<Ctx>) -> Option<Handle> {
    let settings = match Settings::from_run(&ctx.run, std::env::var("NODE_NAME").ok()) {
        Ok(s) => s,
        Err(why) => {
            info!(reason = %why, "not publishing node capacity to the Kubernetes API");
            return None;
        }
    };
    let (tx, rx) = watch::channel(ctx.slots_total);
    // Builds in use: slots held, less the unclaimed warm instances holding one.
    let in_use = {
        let ctx = ctx.clone();
        move || {
            let warm = ctx.registry.warm_len() as u64;
            ctx.slots_in_use().saturating_sub(warm)
        }
    };
    let mut shutdown = ctx.shutdown.subscribe();
    let task = tokio::spawn(async move {
        let stop = async move { crate::raised(&mut shutdown).await };
        tokio::pin!(stop);
        let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max, settings.jitter);
        let client = loop {
            match default_client(settings.request_timeout).await {
                Ok(c) => break c,
                Err(e) => {
                    let wait = backoff.at_cap();
                    error!(node = %settings.node, error = %e, retry_in = ?wait, fix = "run in a pod with a ServiceAccount token mounted, or set KUBECONFIG", "no Kubernetes API configuration; node capacity not published yet");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        };
        info!(node = %settings.node, resource = %settings.resource, "publishing node capacity to the Kubernetes API");
        Publisher::new(client, settings, rx, in_use).run(stop).await;
    });
    Some(Handle { slots: tx, task })
}
