//! Why a pod's instance ended, as a Kubernetes Event on the pod. On a pod's
//! own socket the daemon may serve the pod without the agent in the path,
//! so the GOAWAY note (see `proxy`) cannot reach the client; `kubectl
//! describe pod` and `kubectl get events` can. This module decides which
//! ends are worth an Event and builds the `events.k8s.io/v1` object; `post`
//! sends it.
//!
//! | end            | type    | reason              |
//! |----------------|---------|---------------------|
//! | OOM kill       | Warning | `BuildOOMKilled`    |
//! | pids limit     | Warning | `BuildPidsLimit`    |
//! | disk limit     | Warning | `BuildDiskLimit`    |
//! | daemon exit    | Warning | `BuildDaemonExited` |
//! | start failure  | Warning | `BuildStartFailed`  |
//! | node drain     | Warning | `BuildDrained`      |
//! | idle timeout   | Normal  | `BuildInstanceIdle` |
//! | unpublish      | none: the pod is being deleted, nobody reads it |
//! | one connection | none: never a pod's instance                    |
//!
//! And while an instance runs, a limit hit that does not end it (the OOM
//! killer taking one build step, which buildkit reports only as exit code
//! 137; a fork refused at the pids limit): Warning `BuildStepOOMKilled` or
//! `BuildPidsLimitHit`, action `Limit`, once per new hit seen.

use crate::client::PodRef;
use crate::phase::EndReason;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use std::time::Duration;

/// `reportingController` of every Event berth posts.
pub const CONTROLLER: &str = "berth.dev/agent";
/// The API's limit on `note` (bytes).
pub const NOTE_MAX: usize = 1024;
/// The API's limit on `reportingInstance`, `action` and `reason`.
const FIELD_MAX: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Normal,
    Warning,
}

impl Type {
    pub fn as_str(self) -> &'static str {
        match self {
            Type::Normal => "Normal",
            Type::Warning => "Warning",
        }
    }
}

/// What the pod's Event says: type, reason, action and note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub type_: Type,
    pub reason: &'static str,
    /// What berth did: `Start` (the instance did not start) or `Reap`.
    pub action: &'static str,
    pub note: String,
}

/// The Notice for an instance `id` that ended for `reason`; `why` is the
/// end note's reason in words (the same text the GOAWAY note carries on the
/// node socket; for a start failure, the error). None: no Event for it.
pub fn notice(reason: EndReason, id: &str, why: Option<&str>, idle: Duration) -> Option<Notice> {
    let why = why.unwrap_or("the daemon ended");
    let warn = |reason: &'static str, note: String| Notice { type_: Type::Warning, reason, action: "Reap", note };
    let n = match reason {
        EndReason::Oom => warn("BuildOOMKilled", format!("berth instance {id} ended: {why}")),
        EndReason::Pids => warn("BuildPidsLimit", format!("berth instance {id} ended: {why}")),
        EndReason::Disk => warn("BuildDiskLimit", format!("berth instance {id} ended: {why}")),
        EndReason::DaemonExit => warn("BuildDaemonExited", format!("berth instance {id} ended: {why}")),
        EndReason::Drain => warn("BuildDrained", format!("berth instance {id} ended: {why}")),
        EndReason::Error => Notice {
            type_: Type::Warning,
            reason: "BuildStartFailed",
            action: "Start",
            note: format!("berth instance {id} could not start: {why}"),
        },
        EndReason::Idle => Notice {
            type_: Type::Normal,
            reason: "BuildInstanceIdle",
            action: "Reap",
            note: format!(
                "berth instance {id} ended after {} without a connection; the pod's next build starts a fresh daemon (empty cache)",
                humantime::format_duration(idle)
            ),
        },
        EndReason::Unpublished | EndReason::Closed => return None,
    };
    Some(Notice { note: truncate(n.note, NOTE_MAX), ..n })
}

/// A limit hit inside a running instance (see `reap::watch_limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    /// `n` processes of the build OOM-killed so far, at `limit` (its words).
    Memory { n: u64 },
    /// `n` forks refused so far.
    Pids { n: u64 },
}

/// The Notice for a limit hit that did not end instance `id`; `limit` is
/// the limit in words (`2Gi`, `4096`).
pub fn hit_notice(hit: Hit, id: &str, limit: &str) -> Notice {
    let (reason, note) = match hit {
        Hit::Memory { n } => (
            "BuildStepOOMKilled",
            format!("a process of the build in berth instance {id} was OOM-killed at its memory limit of {limit} ({n} so far); the step fails with exit code 137"),
        ),
        Hit::Pids { n } => (
            "BuildPidsLimitHit",
            format!("a fork in the build in berth instance {id} was refused at its limit of {limit} processes and threads ({n} so far)"),
        ),
    };
    Notice { type_: Type::Warning, reason, action: "Limit", note }
}

/// The `events.k8s.io/v1` Event about `pod`, reported by the agent on `node`.
pub fn event(pod: &PodRef, notice: &Notice, node: &str, now: k8s_openapi::jiff::Timestamp) -> Event {
    // As client-go names them: the object's name, a dot, the time in hex;
    // the name is a DNS subdomain (at most 253 characters).
    let suffix = format!(".{:x}", now.as_nanosecond());
    let name = format!("{}{suffix}", truncate(pod.name.clone(), 253 - suffix.len()));
    Event {
        metadata: ObjectMeta { name: Some(name), namespace: Some(pod.namespace.clone()), ..Default::default() },
        event_time: Some(MicroTime(now)),
        type_: Some(notice.type_.as_str().into()),
        reason: Some(notice.reason.into()),
        action: Some(notice.action.into()),
        note: Some(notice.note.clone()),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            ..Default::default()
        }),
        reporting_controller: Some(CONTROLLER.into()),
        reporting_instance: Some(truncate(node.to_string(), FIELD_MAX)),
        ..Default::default()
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodRef {
        PodRef { namespace: "ci".into(), name: "runner-7".into(), uid: "0c6a-uid".into() }
    }

    #[test]
    fn each_end_maps_to_its_reason_and_type() {
        let idle = Duration::from_secs(300);
        let oom = "its build hit the memory limit of 2Gi and was OOM-killed";
        let n = notice(EndReason::Oom, "abc123", Some(oom), idle).unwrap();
        assert_eq!((n.type_, n.reason, n.action), (Type::Warning, "BuildOOMKilled", "Reap"));
        assert_eq!(n.note, format!("berth instance abc123 ended: {oom}"));
        let cases = [
            (EndReason::Pids, Type::Warning, "BuildPidsLimit", "Reap"),
            (EndReason::Disk, Type::Warning, "BuildDiskLimit", "Reap"),
            (EndReason::DaemonExit, Type::Warning, "BuildDaemonExited", "Reap"),
            (EndReason::Drain, Type::Warning, "BuildDrained", "Reap"),
            (EndReason::Error, Type::Warning, "BuildStartFailed", "Start"),
            (EndReason::Idle, Type::Normal, "BuildInstanceIdle", "Reap"),
        ];
        for (reason, t, r, a) in cases {
            let n = notice(reason, "abc123", Some("why"), idle).unwrap();
            assert_eq!((n.type_, n.reason, n.action), (t, r, a), "{reason:?}");
            assert!(n.note.starts_with("berth instance abc123 "), "{}", n.note);
        }
        let n = notice(EndReason::Error, "x", Some("daemon not ready within 30s"), idle).unwrap();
        assert_eq!(n.note, "berth instance x could not start: daemon not ready within 30s");
        assert!(notice(EndReason::Idle, "x", None, idle).unwrap().note.contains("after 5m without a connection"));
        assert_eq!(notice(EndReason::Unpublished, "x", Some("gone"), idle), None);
        assert_eq!(notice(EndReason::Closed, "x", None, idle), None);
        // Every reason is decided: a new EndReason needs a row above.
        for r in EndReason::ALL {
            let _ = notice(r, "x", None, idle);
        }
    }

    #[test]
    fn limit_hits_in_a_running_build_are_warnings() {
        let n = hit_notice(Hit::Memory { n: 2 }, "abc", "2Gi");
        assert_eq!((n.type_, n.reason, n.action), (Type::Warning, "BuildStepOOMKilled", "Limit"));
        assert!(
            n.note.contains("berth instance abc") && n.note.contains("2Gi") && n.note.contains("137"),
            "{}",
            n.note
        );
        let n = hit_notice(Hit::Pids { n: 1 }, "abc", "4096");
        assert_eq!(n.reason, "BuildPidsLimitHit");
        assert!(n.note.contains("limit of 4096 processes"), "{}", n.note);
    }

    #[test]
    fn notes_fit_the_api_limit_at_a_character_boundary() {
        let long = "é".repeat(2000);
        let n = notice(EndReason::DaemonExit, "x", Some(&long), Duration::ZERO).unwrap();
        assert!(n.note.len() <= NOTE_MAX && n.note.len() > NOTE_MAX - 4, "{}", n.note.len());
        assert!(n.note.ends_with('é'));
    }

    #[test]
    fn the_event_is_about_the_pod_with_its_uid() {
        let now = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let n = notice(EndReason::Oom, "abc", Some("oom"), Duration::ZERO).unwrap();
        let ev = event(&pod(), &n, "node-a", now);
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["metadata"]["namespace"], "ci");
        let name = v["metadata"]["name"].as_str().unwrap();
        assert_eq!(name, format!("runner-7.{:x}", now.as_nanosecond()));
        assert_eq!(
            v["regarding"],
            serde_json::json!({"apiVersion": "v1", "kind": "Pod", "name": "runner-7", "namespace": "ci", "uid": "0c6a-uid"})
        );
        assert_eq!(v["type"], "Warning");
        assert_eq!(v["reason"], "BuildOOMKilled");
        assert_eq!(v["action"], "Reap");
        assert_eq!(v["note"], "berth instance abc ended: oom");
        assert_eq!(v["reportingController"], CONTROLLER);
        assert_eq!(v["reportingInstance"], "node-a");
        assert_eq!(v["eventTime"], "2027-01-15T08:00:00.000000Z");
        // A pod name at the limit still makes a valid name.
        let long = PodRef { name: "p".repeat(253), ..pod() };
        let ev = event(&long, &n, &"n".repeat(300), now);
        assert!(ev.metadata.name.unwrap().len() <= 253);
        assert_eq!(ev.reporting_instance.unwrap().len(), 128);
    }
}
