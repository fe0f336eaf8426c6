//! The errors of admission and spawn, and the one place that decides what a
//! client sees for each: a gRPC code and a message (`AdmitError::code`;
//! `refuse` sends it).
//!
//! Codes say what happened, not where: RESOURCE_EXHAUSTED only when the node
//! is really full (no slot, no queue place, no id range left), so that a
//! client or scheduler may wait or go elsewhere; an I/O failure on the
//! node's own files is INTERNAL and names the path and the errno, so that an
//! operator can fix it; a daemon that did not start or ended is UNAVAILABLE.

use crate::idmap::IdmapError;
use berth_shim::cgroup::CgroupError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

/// Why an instance could not be created (before its daemon ever ran).
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("leasing an id range: {0}")]
    Lease(#[source] IdmapError),
    #[error("laying out {path}: {source}")]
    Layout { path: PathBuf, source: std::io::Error },
    #[error("recording the spec: {0}")]
    Spec(#[source] berth_shim::spec::SpecError),
    #[error("creating the cgroup: {0}")]
    Cgroup(#[source] CgroupError),
    #[error("making its disk: {0}")]
    Disk(#[source] berth_shim::disk::DiskError),
    #[error("starting {path}: {source}")]
    Exec { path: PathBuf, source: std::io::Error },
    #[error("the prepare task failed: {0}")]
    Task(String),
    #[error("isolated network: {0}")]
    Network(#[source] crate::network::NetworkError),
    #[error("{0}")]
    Notify(#[source] crate::notify::NotifyError),
}

impl SpawnError {
    /// True when the node is full rather than broken.
    pub fn is_exhausted(&self) -> bool {
        use crate::network::{pool::PoolError, NetworkError};
        matches!(
            self,
            SpawnError::Lease(IdmapError::Exhausted(_))
                | SpawnError::Network(NetworkError::Pool(PoolError::Exhausted(_)))
        )
    }

    pub fn metric_label(&self) -> &'static str {
        if self.is_exhausted() {
            "exhausted"
        } else {
            "internal"
        }
    }
}

/// Why a connection is not served. Cloned: a start failure is answered to
/// every waiting connection and from the failure cache.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdmitError {
    #[error("instance {id} for {client} failed to start: {reason}; daemon stderr: {tail}")]
    StartFailed { id: String, client: String, reason: String, tail: String },
    #[error("instance {id} did not answer on its socket within {timeout:?}; daemon stderr: {tail}")]
    NotReady { id: String, timeout: Duration, tail: String },
    #[error("node {node}: instance {id} could not be created: {source}")]
    Spawn { node: String, id: String, source: Arc<SpawnError> },
    #[error("instance {id} ended before this connection could be served; retry")]
    Gone { id: String },
    #[error("node {0} is draining and takes no new builds; retry on another node")]
    Draining(String),
    #[error("{0}")]
    Exhausted(String),
    /// The client hung up while queued; nobody to tell.
    #[error("the client hung up while queued")]
    ClientGone,
}

impl AdmitError {
    /// The bounded label for the refused-connections metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AdmitError::StartFailed { .. } | AdmitError::NotReady { .. } => "start_failed",
            AdmitError::Spawn { source, .. } => source.metric_label(),
            AdmitError::Gone { .. } => "gone",
            AdmitError::Draining(_) => "draining",
            AdmitError::Exhausted(_) => "exhausted",
            AdmitError::ClientGone => "client_gone",
        }
    }

    /// The gRPC code the client sees: the one conversion (see module doc).
    pub fn code(&self) -> Code {
        match self {
            AdmitError::StartFailed { .. } | AdmitError::NotReady { .. } | AdmitError::Gone { .. } => Code::Unavailable,
            AdmitError::Draining(_) => Code::Unavailable,
            AdmitError::Exhausted(_) => Code::ResourceExhausted,
            AdmitError::Spawn { source, .. } if source.is_exhausted() => Code::ResourceExhausted,
            AdmitError::Spawn { .. } | AdmitError::ClientGone => Code::Internal,
        }
    }

    /// The status sent to the client.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code(), format!("berth: {self}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn spawn(source: SpawnError) -> AdmitError {
        AdmitError::Spawn { node: "n1".into(), id: "abc".into(), source: Arc::new(source) }
    }

    #[test]
    fn an_unwritable_lease_dir_is_internal_and_names_the_path() {
        let path = PathBuf::from("/var/lib/berth/leases/1048576");
        let e = spawn(SpawnError::Lease(IdmapError::Io { path, source: io::Error::from_raw_os_error(20) }));
        let s = e.to_status();
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().contains("/var/lib/berth/leases/1048576"), "{}", s.message());
        assert!(s.message().contains("Not a directory (os error 20)"), "{}", s.message());
        assert_eq!(e.metric_label(), "internal");
    }

    #[test]
    fn only_a_full_node_is_resource_exhausted() {
        let full = spawn(SpawnError::Lease(IdmapError::Exhausted(4)));
        assert_eq!(full.to_status().code(), Code::ResourceExhausted);
        assert_eq!(full.metric_label(), "exhausted");
        assert_eq!(AdmitError::Exhausted("queue full".into()).code(), Code::ResourceExhausted);
        let broken = [
            SpawnError::Layout { path: "/s/instances/x".into(), source: io::Error::from_raw_os_error(28) },
            SpawnError::Exec { path: "/bin/berth-shim".into(), source: io::Error::from_raw_os_error(2) },
            SpawnError::Cgroup(CgroupError::Io {
                path: "/sys/fs/cgroup/x".into(),
                source: io::Error::from_raw_os_error(13),
            }),
        ];
        for b in broken {
            let e = spawn(b);
            assert_eq!(e.code(), Code::Internal, "{e}");
            assert!(e.to_string().contains('/'), "names a path: {e}");
        }
        let gone = AdmitError::Gone { id: "x".into() };
        assert_eq!(gone.code(), Code::Unavailable);
    }
}
