//! berth-shim: the per-instance supervisor, after the containerd-shim pattern.
//!
//! The agent is a multi-threaded tokio process, so it never forks into new
//! namespaces itself. It spawns this single-threaded shim, which clones the
//! daemon into new user, mount, pid, ipc and uts namespaces, maps its ids
//! through a parent/child handshake, supervises it, and on the end kills,
//! reaps and wipes. The library half holds the on-disk contract (`spec`) and
//! the cgroup driver, which the agent shares.

/// One line of the shim's own log on stderr, tagged with the instance id.
/// Plain lines are enough: the agent forwards the shim's stderr to its log.
macro_rules! log {
    ($id:expr, $($arg:tt)*) => {
        $crate::log_line(&format!("berth-shim[{}]: {}\n", $id, format_args!($($arg)*)))
    };
}
pub(crate) use log;

/// Writes one whole line to stderr in one write(2). stderr is unbuffered
/// and shared with the agent (and every other shim): `eprintln!` may split
/// a line into several writes, which then interleave with theirs and break
/// the agent's JSON log lines. A write of up to PIPE_BUF bytes is atomic.
pub fn log_line(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

pub mod cgroup;
pub mod cli;
pub mod delete;
pub mod probe;
pub mod run;
pub mod spec;
pub mod sys;
pub mod teardown;
pub mod wipe;
