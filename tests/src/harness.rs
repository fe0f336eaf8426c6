//! Drives the real binaries for the end-to-end suites: a `berth-agent run` in
//! a fresh temp environment ([`Agent`]), a scan for anything an instance could
//! leave behind ([`Agent::leak_scan`]), and `fakeclient` runs as separate
//! client processes ([`fakeclient`], [`run_fakeclient`]).
//!
//! The binaries are looked up in the target profile dir of the running test
//! executable (`target/<profile>/deps/<test>` -> `target/<profile>/`); build
//! them first with `cargo build --workspace --bins` (or set `BERTH_BIN_DIR`).

use serde_json::Value;
use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long [`AgentBuilder::start`] and [`Agent::restart`] wait for the socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Ids per instance; the agent gets 8 instances' worth by default.
pub const IDS_PER_INSTANCE: u32 = 65536;
/// Default `--idmap-count`.
pub const DEFAULT_IDMAP_COUNT: u32 = 8 * IDS_PER_INSTANCE;

mod agent;
mod bins;
mod builder;
mod leak;
mod logs;
mod sibling;
#[cfg(test)]
mod tests;

pub use agent::*;
pub use bins::*;
pub use builder::*;
pub use leak::*;
pub use logs::*;
pub use sibling::*;
