//! Where an instance is in its life, as one value: the instance keeps it in
//! one `watch`, so admission, the proxy, the warm pool and CSI all wait on
//! the same channel and never see two fields disagree.
//!
//! ```text
//! Starting --ready, claimed--> Ready --end--> Ending{note} --wiped--> Wiped{..}
//!    |  \--ready, warm--> WarmIdle --claim--> Ready
//!    |  \--held, sandbox--> WarmIdle --claim--> Starting (its daemon execs)
//!    \--failed--> Failed --wiped--> Wiped{failure}
//! ```
//! Only the instance's life task moves it forward, except a claim, which
//! moves `WarmIdle` to `Ready`, or a held sandbox's back to `Starting` (see
//! `Instance::claim`).

use crate::error::AdmitError;

#[derive(Debug, Clone)]
pub enum Phase {
    /// Spawned, the daemon not answering yet.
    Starting,
    /// A warm instance whose daemon answers (or a warm sandbox, made up to
    /// its daemon's exec), waiting for a client.
    WarmIdle,
    /// Serving its client.
    Ready,
    /// Did not start; connections waiting on it get this error.
    Failed(AdmitError),
    /// Being torn down. `note` says why, for clients still connected, once
    /// the shim's outcome is in (None for an ordinary end).
    Ending { note: Option<String> },
    /// Torn down and wiped; its slot is free. Keeps the end note and the
    /// start failure for anyone who looks late.
    Wiped { note: Option<String>, failure: Option<AdmitError> },
}

impl Phase {
    /// True once nothing of the instance runs any more or will.
    pub fn is_over(&self) -> bool {
        matches!(self, Phase::Failed(_) | Phase::Ending { .. } | Phase::Wiped { .. })
    }

    pub fn is_wiped(&self) -> bool {
        matches!(self, Phase::Wiped { .. })
    }

    /// The reason the instance ended, for clients still connected.
    pub fn end_note(&self) -> Option<&str> {
        match self {
            Phase::Ending { note } | Phase::Wiped { note, .. } => note.as_deref(),
            _ => None,
        }
    }
}

/// Why an instance ended; the metrics encode it as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    Idle,
    Closed,
    Unpublished,
    Oom,
    /// The daemon died while its disk was full (see `disk`).
    Disk,
    Pids,
    DaemonExit,
    Drain,
    Error,
}

impl EndReason {
    pub const ALL: [EndReason; 9] = [
        EndReason::Idle,
        EndReason::Closed,
        EndReason::Unpublished,
        EndReason::Oom,
        EndReason::Disk,
        EndReason::Pids,
        EndReason::DaemonExit,
        EndReason::Drain,
        EndReason::Error,
    ];

    /// The metric label value and the log field.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Idle => "idle",
            EndReason::Closed => "closed",
            EndReason::Unpublished => "unpublished",
            EndReason::Oom => "oom",
            EndReason::Disk => "disk",
            EndReason::Pids => "pids",
            EndReason::DaemonExit => "daemon_exit",
            EndReason::Drain => "drain",
            EndReason::Error => "error",
        }
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
