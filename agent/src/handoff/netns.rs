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
    pub fn new(listener: BorrowedFd<'_>, file: SocketFile, inst_dir: &Path, proc_root: &Path) -> io::Result<Counter> {
        let name = getsockname::<SockaddrStorage>(listener.as_raw_fd())
            .ok()
            .and_then(|a| a.as_unix_addr().and_then(|u| u.path()).map(Path::to_path_buf))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the pod's listener has no path"))?;
        let own_ns = ssys::socket_netns(listener)
            .map_err(|e| errno_at(e, "SIOCGSKNS on the pod's listener"))
            .and_then(|ns| ns_id(ns.as_fd()))?;
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
    pub fn count(&mut self) -> io::Result<usize> {
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

    fn count_known(&mut self) -> io::Result<usize> {
        if self.own.is_none() {
            self.own = Some(diag::socket()?);
        }
        let own = self.own.as_mut().expect("set above");
        let mut n = match diag::count_on(own, self.file) {
            Ok(n) => n,
            Err(e) => {
                // A socket whose dump failed half-way may hold the rest.
                self.own = None;
                return Err(e);
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
                    return Err(e);
                }
            }
        }
        Ok(n)
    }

    /// Looks at the daemon's sockets not seen yet; returns how many new
    /// namespaces it found.
    fn discover(&mut self) -> io::Result<usize> {
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

    fn discover_in(&mut self, pid: i32, pidfd: BorrowedFd<'_>) -> io::Result<usize> {
        let dir = self.proc_root.join(pid.to_string()).join("fd");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // The daemon is gone: its instance is ending.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        };
        let mut now = HashSet::new();
        let mut found = 0;
        for e in entries.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let Some(ino) = std::fs::read_link(e.path()).ok().and_then(|t| socket_inode(&t)) else { continue };
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
    fn pod_connection_netns(&self, pid: i32, pidfd: BorrowedFd<'_>, fd: i32) -> io::Result<Option<OwnedFd>> {
        let sock = match ssys::pidfd_getfd(pidfd, fd) {
            Ok(s) => s,
            // Closed since the listing, or the daemon is gone.
            Err(Errno::EBADF | Errno::ESRCH) => return Ok(None),
            Err(e) => {
                let what = format!("pidfd_getfd of fd {fd} of the daemon (pid {pid}; the agent needs CAP_SYS_PTRACE)");
                return Err(errno_at(e, &what));
            }
        };
        let Ok(addr) = getsockname::<SockaddrStorage>(sock.as_raw_fd()) else { return Ok(None) };
        if addr.as_unix_addr().and_then(|u| u.path()) != Some(self.name.as_path()) {
            return Ok(None);
        }
        // The listener itself (the daemon's fd 3) carries the name too.
        if getsockopt(&sock, sockopt::AcceptConn).unwrap_or(true) {
            return Ok(None);
        }
        ssys::socket_netns(sock.as_fd())
            .map(Some)
            .map_err(|e| errno_at(e, &format!("SIOCGSKNS on fd {fd} of the daemon (pid {pid})")))
    }

    /// Starts asking namespace `ns` too, unless it is known; 1 if it was new.
    fn add(&mut self, ns: OwnedFd) -> io::Result<usize> {
        let id = ns_id(ns.as_fd())?;
        if id == self.own_ns || self.foreign.iter().any(|f| f.ns == id) {
            return Ok(0);
        }
        let diag = socket_in(ns)?;
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
