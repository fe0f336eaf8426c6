//! berth-shim: the per-instance supervisor, after the containerd-shim pattern.
//!
//! The agent is a multi-threaded tokio process, so it never forks into new
//! namespaces itself. It spawns this single-threaded shim, which clones the
//! daemon into new user, mount, pid, ipc and uts namespaces, maps its ids
//! through a parent/child handshake, supervises it, and on the end kills,
//! reaps and wipes. The library half holds the on-disk contract (`spec`) and
//! the cgroup driver, which the agent shares.

pub mod cgroup;
pub mod spec;
