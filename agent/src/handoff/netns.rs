//! Counting a pod's connections where they live: in the pod's network
//! namespace, not the agent's.
//!
//! The kernel creates the accepted end of a unix connection in the network
//! namespace of the process that CONNECTED (`unix_stream_connect`), and a
//! sock_diag dump lists the sockets of one namespace: the one the netlink
//! socket asking was created in. A CI pod has a network namespace of its own,
//! so the daemon's accepted connections of that pod are not in the agent's
//! dump; only those still waiting in the listener's backlog are (on the
//! listener, which lives in the agent's namespace). Counting there alone,
//! the idle reaper would end a running build.
//!
//! So a [`Counter`] dumps the agent's namespace (the backlog, and the
//! connections of a `hostNetwork` pod) and every namespace the pod's
//! connections were found in. A namespace is found from the daemon's side,
//! which holds every accepted connection (its host pid is in the instance's
//! `daemon.pid`): `pidfd_getfd(2)` copies one of its socket descriptors,
//! `getsockname` tells whether it was accepted from the pod's listener (an
//! accepted unix socket carries the listener's address) and `SIOCGSKNS`
//! opens its namespace. A NETLINK_SOCK_DIAG socket created there (by a
//! short-lived thread that `setns`es into it, so no worker of the agent
//! changes namespace) asks that namespace for the rest of the instance's
//! life: the lookup runs once per namespace, not per count.
//!
//! The lookup runs only when a count finds nothing, and looks at each of the
//! daemon's sockets once (by inode): a connection in a namespace not yet
//! known is a socket not yet looked at, so an instance is never taken for
//! idle while its daemon holds a pod connection anywhere. What it costs is in
//! docs/benchmarks.md (figure 10, the foreign-namespace rows).
//!
//! Other ways weighed: the client's pid (SO_PEERCRED on a copied socket,
//! then `/proc/<pid>/ns/net`) is 0 for a client in another pid namespace
//! (every pod without hostPID) and may have exited while its connection
//! lives; the socket's netns cookie (SO_NETNS_COOKIE) names a namespace but
//! cannot enter it; the instance cgroup's counters cannot tell a connection
//! from none (figure 10). A cached socket holds a reference on the pod's
//! namespace until the instance ends (its idle reap, or unpublish at the
//! latest). Hand-written because no crate in the tree wraps pidfd_getfd or
//! SIOCGSKNS; the three raw calls are in the shim's `sys`, the workspace's
//! only unsafe code.

use super::diag::{self, SocketFile};
use berth_shim::spec::{PidStamp, DAEMON_PID_FILE};
use berth_shim::sys as ssys;
use netlink_sys::Socket;
use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockaddrStorage};
use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Why a count failed. Each failure is counted on /metrics by
/// [`CountError::metric_label`]; the instance then counts as in use
/// (handoff.rs, `count_conns`).
#[derive(Debug, thiserror::Error)]
pub enum CountError {
    /// The pod's listener has no path, or its namespace cannot be read.
    #[error("the pod's listener {name}: {source}")]
    Listener { name: String, source: io::Error },
    /// A sock_diag dump failed (socket, send, answer), in the agent's
    /// namespace or a pod's.
    #[error("sock_diag dump of the {ns} network namespace: {source}")]
    SockDiag { ns: &'static str, source: io::Error },
    /// The daemon's descriptors cannot be listed or read: ptrace access
    /// refused (an LSM profile or Yama; a root agent owns the daemon's user
    /// namespace, so capabilities alone do not refuse it).
    #[error("{path}: {source} (the agent needs ptrace access to the daemon: no AppArmor/SELinux profile or Yama setting denying it)")]
    DaemonFds { path: PathBuf, source: io::Error },
    /// pidfd_getfd(2) of one of the daemon's descriptors refused (seccomp:
    /// the runtimes' default profile refuses it without CAP_SYS_PTRACE).
    #[error("pidfd_getfd of fd {fd} of the daemon (pid {pid}): {source} (the agent needs CAP_SYS_PTRACE, and a seccomp profile that allows the call: Unconfined, or a privileged container)")]
    Getfd { pid: i32, fd: i32, source: Errno },
    /// The pod's network namespace: SIOCGSKNS, its identity, or setns.
    #[error("{what}: {source}")]
    Netns { what: String, source: io::Error },
    /// The blocking count task itself failed (panicked or was cancelled).
    #[error("the count task: {0}")]
    Task(String),
}

impl CountError {
    /// A bounded label, one of `metrics::HANDOFF_COUNT_REASONS`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            CountError::Listener { .. } => "listener",
            CountError::SockDiag { .. } => "sock_diag",
            CountError::DaemonFds { .. } => "daemon_fds",
            CountError::Getfd { .. } => "pidfd_getfd",
            CountError::Netns { .. } => "netns",
            CountError::Task(_) => "internal",
        }
    }
}

/// A network namespace the pod's connections were found in.
struct Foreign {
    /// The namespace's nsfs inode (unique while the namespace lives, and
    /// the cached socket keeps it alive).
    ns: u64,
    diag: Socket,
}

/// Counts the connections of one pod's listener in every namespace they
/// live in. Blocking; one per fd-passed instance, used from one task.
pub struct Counter {
    file: SocketFile,
    /// The address every connection accepted from the listener reports.
    name: PathBuf,
    /// The agent's namespace (the listener's) and a diag socket asking it.
    own_ns: u64,
    own: Option<Socket>,
    pid_file: PathBuf,
    proc_root: PathBuf,
    /// The daemon, once it runs: its host pid and a pidfd pinning it.
    daemon: Option<(i32, OwnedFd)>,
    /// The daemon's socket inodes looked at already.
    seen: HashSet<u64>,
    foreign: Vec<Foreign>,
}

impl Counter {
    /// A counter for the pod's `listener` (bound at `file`), served by the
    /// daemon of the instance in `inst_dir`; `proc_root` is the host's /proc.
    pub fn new(
        listener: BorrowedFd<'_>,
        file: SocketFile,
        inst_dir: &Path,
        proc_root: &Path,
    ) -> Result<Counter, CountError> {
        let name = getsockname::<SockaddrStorage>(listener.as_raw_fd())
            .ok()
            .and_then(|a| a.as_unix_addr().and_then(|u| u.path()).map(Path::to_path_buf))
            .ok_or_else(|| CountError::Listener {
                name: format!("fd {}", listener.as_raw_fd()),
                source: io::Error::new(io::ErrorKind::InvalidInput, "no path"),
            })?;
        let own_ns = ssys::socket_netns(listener)
            .map_err(|e| errno_at(e, "SIOCGSKNS"))
            .and_then(|ns| ns_id(ns.as_fd()))
            .map_err(|source| CountError::Listener { name: name.display().to_string(), source })?;
        Ok(Counter {
            file,
            name,
            own_ns,
            own: None,
            pid_file: inst_dir.join(DAEMON_PID_FILE),
            proc_root: proc_root.to_path_buf(),
            daemon: None,
            seen: HashSet::new(),
            foreign: Vec::new(),
        })
    }

    /// The daemon's connections on the pod's listener in every namespace
    /// known, plus those waiting in its backlog; when that finds none, looks
    /// for namespaces not known yet and counts again.
    pub fn count(&mut self) -> Result<usize, CountError> {
        let n = self.count_known()?;
        if n > 0 || self.discover()? == 0 {
            return Ok(n);
        }
        self.count_known()
    }

    /// How many namespaces other than the agent's the pod's connections
    /// were found in (for the log).
    pub fn foreign_namespaces(&self) -> usize {
        self.foreign.len()
    }

    fn count_known(&mut self) -> Result<usize, CountError> {
        let own_err = |source| CountError::SockDiag { ns: "agent's", source };
        if self.own.is_none() {
            self.own = Some(diag::socket().map_err(own_err)?);
        }
        let own = self.own.as_mut().expect("set above");
        let mut n = match diag::count_on(own, self.file) {
            Ok(n) => n,
            Err(e) => {
                // A socket whose dump failed half-way may hold the rest.
                self.own = None;
                return Err(own_err(e));
            }
        };
        for i in 0..self.foreign.len() {
            match diag::count_on(&mut self.foreign[i].diag, self.file) {
                Ok(k) => n += k,
                Err(e) => {
                    // Found again by the next lookup, which looks at every
                    // socket afresh.
                    self.foreign.remove(i);
                    self.seen.clear();
                    return Err(CountError::SockDiag { ns: "pod's", source: e });
                }
            }
        }
        Ok(n)
    }

    /// Looks at the daemon's sockets not seen yet; returns how many new
    /// namespaces it found.
    fn discover(&mut self) -> Result<usize, CountError> {
        let Some((pid, pidfd)) = self.daemon.take().or_else(|| self.open_daemon()) else {
            return Ok(0);
        };
        let r = self.discover_in(pid, pidfd.as_fd());
        if r.is_ok() {
            self.daemon = Some((pid, pidfd));
        }
        r
    }

    /// The daemon's pid from its record, pinned by a pidfd; None until the
    /// shim has written it, or once the daemon is gone.
    fn open_daemon(&self) -> Option<(i32, OwnedFd)> {
        let stamp = PidStamp::load(&self.pid_file)?;
        let pidfd = ssys::pidfd_open(stamp.pid).ok()?;
        // The pidfd pins a process; the start time says it is the daemon
        // and not a process that got its number since.
        stamp.alive(&self.proc_root).then_some((stamp.pid, pidfd))
    }

    fn discover_in(&mut self, pid: i32, pidfd: BorrowedFd<'_>) -> Result<usize, CountError> {
        let dir = self.proc_root.join(pid.to_string()).join("fd");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // The daemon is gone: its instance is ending.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(CountError::DaemonFds { path: dir, source }),
        };
        let mut now = HashSet::new();
        let mut found = 0;
        for e in entries.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            // Closed since the listing (or the daemon ended): skipped. Any
            // other error (EACCES: no ptrace access) must not pass for "no
            // connection", or a live build would be reaped as idle.
            let target = match std::fs::read_link(e.path()) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(CountError::DaemonFds { path: dir.join(fd.to_string()), source }),
            };
            let Some(ino) = socket_inode(&target) else { continue };
            now.insert(ino);
            if self.seen.contains(&ino) {
                continue;
            }
            if let Some(ns) = self.pod_connection_netns(pid, pidfd, fd)? {
                found += self.add(ns)?;
            }
            self.seen.insert(ino);
        }
        self.seen.retain(|i| now.contains(i));
        Ok(found)
    }

    /// The namespace of the daemon's descriptor `fd` if it is a connection
    /// accepted from the pod's listener.
    fn pod_connection_netns(&self, pid: i32, pidfd: BorrowedFd<'_>, fd: i32) -> Result<Option<OwnedFd>, CountError> {
        let sock = match ssys::pidfd_getfd(pidfd, fd) {
            Ok(s) => s,
            // Closed since the listing, or the daemon is gone.
            Err(Errno::EBADF | Errno::ESRCH) => return Ok(None),
            Err(source) => return Err(CountError::Getfd { pid, fd, source }),
        };
        let Ok(addr) = getsockname::<SockaddrStorage>(sock.as_raw_fd()) else { return Ok(None) };
        if addr.as_unix_addr().and_then(|u| u.path()) != Some(self.name.as_path()) {
            return Ok(None);
        }
        // The listener itself (the daemon's fd 3) carries the name too.
        if getsockopt(&sock, sockopt::AcceptConn).unwrap_or(true) {
            return Ok(None);
        }
        ssys::socket_netns(sock.as_fd()).map(Some).map_err(|e| CountError::Netns {
            what: format!("SIOCGSKNS on fd {fd} of the daemon (pid {pid})"),
            source: io::Error::from(e),
        })
    }

    /// Starts asking namespace `ns` too, unless it is known; 1 if it was new.
    fn add(&mut self, ns: OwnedFd) -> Result<usize, CountError> {
        let netns = |source| CountError::Netns { what: "the pod's network namespace".into(), source };
        let id = ns_id(ns.as_fd()).map_err(netns)?;
        if id == self.own_ns || self.foreign.iter().any(|f| f.ns == id) {
            return Ok(0);
        }
        let diag = socket_in(ns).map_err(netns)?;
        self.foreign.push(Foreign { ns: id, diag });
        Ok(1)
    }
}

/// A sock_diag socket asking namespace `ns`: created by a thread of its own
/// that enters `ns` and ends, so no thread of the agent stays there.
fn socket_in(ns: OwnedFd) -> io::Result<Socket> {
    let t = std::thread::Builder::new().name("berth-netns".into()).spawn(move || {
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| errno_at(e, "setns into the pod's network namespace"))?;
        diag::socket()
    })?;
    t.join().map_err(|_| io::Error::other("the namespace thread panicked"))?
}

/// A namespace's identity: its nsfs inode.
fn ns_id(ns: BorrowedFd<'_>) -> io::Result<u64> {
    nix::sys::stat::fstat(ns).map(|st| st.st_ino).map_err(|e| errno_at(e, "fstat of a network namespace"))
}

/// The inode in a `/proc/<pid>/fd` link `socket:[<inode>]`.
fn socket_inode(target: &Path) -> Option<u64> {
    target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

fn errno_at(e: Errno, what: &str) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests;
