//! Posting pods' Events (see `event`) without ever holding up a reap: the
//! end of an instance writes its log line and puts the Event on a bounded
//! queue; one task posts them, one at a time, to `events.k8s.io/v1`.
//!
//! Every Event ends in `berth_events_total{result}`:
//! - `posted`: the API server created it;
//! - `failed`: the API refused it (403: RBAC, 404, 422), or stayed
//!   unreachable through [`ATTEMPTS`] tries with backoff;
//! - `dropped`: never sent: the queue was full, the agent has no API access
//!   (no kubeconfig, not in a pod; said once at start), or it was still
//!   queued when the agent exited.
//!
//! The log line is written whatever the result, so the reason is never lost.

use super::event;
use crate::client::PodRef;
use crate::publish::{self, Backoff, Class};
use crate::Ctx;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, PostParams};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

/// Events waiting to be posted; beyond this, new ones are dropped (counted).
pub const QUEUE: usize = 256;
/// Tries per Event while the API is unreachable (5xx, 429, no connection).
pub const ATTEMPTS: u32 = 4;
/// First retry delay; doubles per try (with jitter), at most `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Longest one API call may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent's exit waits for queued Events (one try each).
pub const FLUSH: Duration = Duration::from_secs(5);

/// The sending side, kept in `Ctx`.
pub struct Events {
    tx: mpsc::Sender<Event>,
}

/// The posting side: `spawn` takes it.
pub struct Queue {
    rx: mpsc::Receiver<Event>,
}

pub fn queue() -> (Events, Queue) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (Events { tx }, Queue { rx })
}

impl Events {
    /// Writes the log line of what happened to `pod`'s instance (its end,
    /// or a limit hit inside it) and queues its Event. Never waits.
    pub fn report(&self, ctx: &Ctx, pod: &PodRef, instance: &str, n: &event::Notice) {
        let pod_name = format!("{}/{}", pod.namespace, pod.name);
        // One message per kind, so logs can be searched for it.
        match (n.type_, n.action) {
            (event::Type::Warning, "Limit") => {
                warn!(instance, pod = %pod_name, reason = n.reason, note = %n.note, "limit hit in a pod's instance")
            }
            (event::Type::Warning, _) => {
                warn!(instance, pod = %pod_name, reason = n.reason, note = %n.note, "pod's instance ended")
            }
            (event::Type::Normal, _) => {
                info!(instance, pod = %pod_name, reason = n.reason, note = %n.note, "pod's instance ended")
            }
        }
        let ev = event::event(pod, n, &ctx.node_name, k8s_openapi::jiff::Timestamp::now());
        if let Err(e) = self.tx.try_send(ev) {
            ctx.metrics.event("dropped");
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "the queue of Events to post is full",
                mpsc::error::TrySendError::Closed(_) => "the Event poster has stopped",
            };
            warn!(instance, pod = %pod_name, reason = n.reason, why, "Kubernetes Event dropped; the log line above has its note");
        }
    }
}

/// The running poster; `finish` lets it post what is queued, briefly.
pub struct Handle {
    done: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// At the agent's exit: one try per queued Event, for at most `FLUSH`.
    pub async fn finish(self) {
        let _ = self.done.send(());
        let mut task = self.task;
        if tokio::time::timeout(FLUSH, &mut task).await.is_err() {
            task.abort();
            warn!("Kubernetes Events still queued at exit were dropped");
        }
    }
}

/// Starts the poster. The API client is made from the kubeconfig or the
/// pod's service account, as capacity publishing makes its own; without
/// either, Events stay log lines (said once, here).
pub fn spawn(ctx: &Arc<Ctx>, q: Queue) -> Handle {
    let (done, stop) = oneshot::channel();
    let ctx = ctx.clone();
    let task = tokio::spawn(async move {
        let client = match publish::default_client(REQUEST_TIMEOUT).await {
            Ok(c) => Some(c),
            Err(e) => {
                info!(error = %e, "no Kubernetes API access: why a pod's instance ended stays in this log and is not posted as an Event on the pod (run in a pod with a ServiceAccount token, or set KUBECONFIG)");
                None
            }
        };
        run(ctx, client, q, stop).await
    });
    Handle { done, task }
}

/// Posts queued Events until `stop`, then each still queued once.
pub async fn run(ctx: Arc<Ctx>, client: Option<kube::Client>, mut q: Queue, mut stop: oneshot::Receiver<()>) {
    let mut stopping = false;
    loop {
        let ev = if stopping {
            match q.rx.try_recv() {
                Ok(ev) => ev,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                ev = q.rx.recv() => match ev { Some(ev) => ev, None => return },
                _ = &mut stop => { stopping = true; continue }
            }
        };
        let Some(client) = &client else {
            ctx.metrics.event("dropped");
            continue;
        };
        let tries = if stopping { 1 } else { ATTEMPTS };
        let result = post(client, &ev, tries).await;
        ctx.metrics.event(if result { "posted" } else { "failed" });
    }
}

/// Posts `ev`, retrying transient failures up to `tries` times in all.
/// True when the API server created it; every failure is logged.
pub async fn post(client: &kube::Client, ev: &Event, tries: u32) -> bool {
    let ns = ev.metadata.namespace.as_deref().unwrap_or("default");
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let pod = ev.regarding.as_ref().and_then(|r| r.name.as_deref()).unwrap_or("?");
    let reason = ev.reason.as_deref().unwrap_or("?");
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX, true);
    for attempt in 1..=tries {
        let e = match api.create(&PostParams::default(), ev).await {
            Ok(_) => {
                debug!(pod = %format!("{ns}/{pod}"), reason, "posted a Kubernetes Event on the pod");
                return true;
            }
            Err(e) => e,
        };
        match publish::classify(&e) {
            Class::Refused(code) => {
                let fix = match code {
                    403 => "grant the agent's ServiceAccount verb create on resource events in API group events.k8s.io (the chart's RBAC does this)",
                    _ => "the API server refused the Event; the log line of the instance's end has its message",
                };
                error!(pod = %format!("{ns}/{pod}"), reason, code, error = %e, fix, "Kubernetes API refused the pod's Event; not retried");
                return false;
            }
            Class::Transient if attempt < tries => {
                let wait = backoff.next_delay();
                warn!(pod = %format!("{ns}/{pod}"), reason, attempt, retry_in = ?wait, error = %e, "Kubernetes API unavailable for the pod's Event; retrying");
                tokio::time::sleep(wait).await;
            }
            Class::Transient => {
                error!(pod = %format!("{ns}/{pod}"), reason, attempts = tries, error = %e, "Kubernetes API unavailable; the pod's Event is given up (its message is in the log line of the instance's end)");
            }
        }
    }
    false
}
