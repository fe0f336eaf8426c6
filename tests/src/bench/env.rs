//! What the figures run on: a `berth-agent` of the bench's own
//! ([`BenchAgent`], cgroups under `berth-bench/`), a fakekitd started
//! directly ([`Direct`], the baselines), a gRPC connection that records when
//! the first byte from the daemon arrived ([`Conn`]), and a registry of
//! everything to undo ([`Undo`]) that runs on drop, on panic and on
//! SIGINT/SIGTERM.

use crate::harness::{self, LeakScope, LogBuf};
use crate::proto::fake::fake_client::FakeClient;
use crate::proto::fake::{PingReply, PingRequest};
use anyhow::{anyhow, bail, Context, Result};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The first component of every cgroup parent the bench's agents use.
pub const CGROUP_TOP: &str = "berth-bench";
/// Ids per instance (one range each).
pub const IDS_PER_INSTANCE: u32 = 65536;
/// Bound on one call through the agent (spawn + ready + call).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Extra flags appended to every agent's command line (`--agent-arg`, for
/// experiments: later flags override earlier ones).
pub static EXTRA_AGENT_ARGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Progress line on stderr (the table goes to stdout).
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => { eprintln!("berth-bench: {}", format_args!($($arg)*)) };
}

mod agent;
mod conn;
mod direct;
mod proc;
mod undo;
mod watch;

pub use agent::*;
pub use conn::*;
pub use direct::*;
pub use proc::*;
pub use undo::*;
pub use watch::*;
