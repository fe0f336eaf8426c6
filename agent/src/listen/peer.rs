//! Who is on the other end of a node-socket connection.
//!
//! On the shared node socket an instance belongs to a client, so telling two
//! clients apart is a security boundary: two pods merged into one client
//! would share one daemon, its cache and its secrets. The rule is therefore
//! never to guess. A peer is one of:
//!
//! - **Cgroup**: its pid is visible (the agent runs with `hostPID`, or
//!   `--proc-root` is a procfs of the host's pid namespace), so its cgroup,
//!   hence its container, names it. The pid is read through the peer's
//!   pidfd too, so a pid reused between SO_PEERCRED and the cgroup read is
//!   caught rather than misattributed.
//! - **Namespace**: its pid is 0 (it lives outside the agent's pid
//!   namespace), but its pidfd (SO_PEERPIDFD, Linux 6.5) opens its pid and
//!   mount namespaces (Linux 6.11). A pid namespace that does not contain the
//!   agent is a sibling branch, i.e. another container's or pod's own; every
//!   process of one container shares its mount namespace, and no other
//!   container can hold it. The mount namespace's 64-bit id is never reused,
//!   so a later pod cannot inherit an earlier one's instance.
//! - **Unknown**: anything else, notably a peer in the host's pid namespace
//!   (an ancestor of the agent's: a host process or a `hostPID` pod), where
//!   processes in different cgroups share every namespace. Each of its
//!   connections is a client of its own, and the agent says once, loudly,
//!   how to get per-pod sharing back.
//!
//! Measured on Linux 6.18 with the agent under `unshare --pid --fork`: for a
//! peer outside the agent's pid namespace SO_PEERCRED gives pid 0, the
//! pidfd's fdinfo gives `Pid: 0`, PIDFD_GET_INFO fails with EREMOTE, while
//! PIDFD_GET_{PID,MNT}_NAMESPACE and NS_GET_MNTNS_ID work.
//!
//! The three ioctls live in the shim library's `sys` module, the one place
//! with unsafe code; the rest is plain reads.

use berth_shim::sys::{self as ssys, PidfdNs};
use nix::sys::socket::{getsockopt, sockopt};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::UnixStream;
use tracing::{debug, warn};

/// What the agent could learn about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Visible pid: `cgroup` is its `/proc/<pid>/cgroup`.
    Cgroup { uid: u32, gid: u32, pid: i32, cgroup: String },
    /// Outside the agent's pid namespace, in a pid namespace of its own branch.
    Namespace { uid: u32, gid: u32, mntns: u64 },
    /// Cannot be told apart from other peers: its own client per connection.
    Unknown { uid: u32, gid: u32, why: Unknown },
}

/// Why a peer could not be identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// SO_PEERCRED failed (the peer is gone).
    NoCredentials,
    /// Its pid was visible but it exited before its cgroup was read.
    Exited,
    /// Pid 0, and the kernel cannot say more (no SO_PEERPIDFD, before 6.5,
    /// or no PIDFD_GET_*_NAMESPACE, before 6.11).
    OldKernel,
    /// Pid 0, in the host's pid namespace (an ancestor of the agent's).
    HostPidNamespace,
}

impl Unknown {
    fn text(self) -> &'static str {
        match self {
            Unknown::NoCredentials => "no peer credentials",
            Unknown::Exited => "the peer exited before it was identified",
            Unknown::OldKernel => "pid not visible, and this kernel cannot identify it (needs Linux 6.11)",
            Unknown::HostPidNamespace => "pid not visible: the peer is in the host's pid namespace",
        }
    }
}

impl Peer {
    /// The registry key of a client that may share an instance, or `None`
    /// when the peer must be a client of its own.
    pub fn key(&self) -> Option<String> {
        match self {
            Peer::Cgroup { uid, gid, cgroup, .. } => Some(format!("uid={uid} gid={gid} cgroup={}", cgroup.trim())),
            Peer::Namespace { uid, gid, mntns } => Some(format!("uid={uid} gid={gid} mntns={mntns}")),
            Peer::Unknown { .. } => None,
        }
    }

    /// How the peer appears in logs.
    pub fn display(&self) -> String {
        match self {
            Peer::Cgroup { uid, pid, cgroup, .. } => format!("uid={uid} pid={pid} cgroup={}", shown_cgroup(cgroup)),
            Peer::Namespace { uid, mntns, .. } => format!("uid={uid} pid=? mntns={mntns}"),
            Peer::Unknown { uid, why, .. } => format!("uid={uid} pid=? cgroup=? ({})", why.text()),
        }
    }
}

/// The cgroup v2 path, else the v1 memory controller's: the container.
fn shown_cgroup(cgroup: &str) -> String {
    let entries = berth_shim::cgroup::parse_proc(cgroup);
    entries
        .iter()
        .find(|e| e.hierarchy == "0" && e.has(""))
        .or_else(|| entries.iter().find(|e| e.has("memory")))
        .map_or_else(|| "?".to_string(), |e| e.path.clone())
}

/// Identifies the peer of `stream`; `proc_root` is the agent's procfs view.
pub fn identify(stream: &UnixStream, proc_root: &Path) -> Peer {
    let Ok(cred) = stream.peer_cred() else {
        return Peer::Unknown { uid: u32::MAX, gid: u32::MAX, why: Unknown::NoCredentials };
    };
    let (uid, gid) = (cred.uid(), cred.gid());
    // ENOPROTOOPT before Linux 6.5.
    let pidfd = getsockopt(&stream.as_fd(), sockopt::PeerPidfd).ok();
    // The pidfd's pid is in the namespace of the procfs we read cgroups
    // from, so it is preferred; SO_PEERCRED's is in the agent's. They differ
    // when `--proc-root` is a hostPath of the host's /proc, which shows
    // peers the agent's own pid namespace hides.
    let peer = match pidfd.as_ref().and_then(|fd| pidfd_pid(proc_root, fd)) {
        Some(pid) if pid > 0 => by_cgroup(proc_root, uid, gid, pid, pidfd.as_ref()),
        Some(-1) => Peer::Unknown { uid, gid, why: Unknown::Exited },
        Some(_) => by_namespace(uid, gid, pidfd.as_ref()),
        // No pidfd (before Linux 6.5) or no fdinfo under --proc-root.
        None => match cred.pid().filter(|p| *p > 0) {
            Some(pid) => by_cgroup(proc_root, uid, gid, pid, None),
            None => by_namespace(uid, gid, pidfd.as_ref()),
        },
    };
    if let Peer::Unknown { why: why @ (Unknown::HostPidNamespace | Unknown::OldKernel), .. } = &peer {
        warn_once(*why);
    }
    debug!(peer = %peer.display(), "identified");
    peer
}

fn by_cgroup(proc_root: &Path, uid: u32, gid: u32, pid: i32, pidfd: Option<&OwnedFd>) -> Peer {
    let Ok(cgroup) = read_small(&proc_root.join(pid.to_string()).join("cgroup")) else {
        return Peer::Unknown { uid, gid, why: Unknown::Exited };
    };
    // The pid may have been reused between SO_PEERCRED and the read; the
    // pidfd pins the peer itself: it must still be alive under that pid.
    // (Without a pidfd, before Linux 6.5, the read is taken as is.)
    if let Some(fd) = pidfd {
        if pidfd_pid(proc_root, fd).is_some_and(|p| p != pid) {
            return Peer::Unknown { uid, gid, why: Unknown::Exited };
        }
    }
    Peer::Cgroup { uid, gid, pid, cgroup }
}

fn by_namespace(uid: u32, gid: u32, pidfd: Option<&OwnedFd>) -> Peer {
    let unknown = |why| Peer::Unknown { uid, gid, why };
    let Some(pidfd) = pidfd else { return unknown(Unknown::OldKernel) };
    let Ok(pidns) = ssys::pidfd_namespace(pidfd.as_fd(), PidfdNs::Pid) else {
        return unknown(Unknown::OldKernel);
    };
    match ssys::self_in_pidns(pidns.as_fd()) {
        Ok(None) => {}
        // The agent is visible there: the peer's pid namespace is the host's
        // (or another ancestor), shared by processes of every cgroup.
        Ok(Some(_)) => return unknown(Unknown::HostPidNamespace),
        Err(_) => return unknown(Unknown::OldKernel),
    }
    let id = ssys::pidfd_namespace(pidfd.as_fd(), PidfdNs::Mnt).and_then(|ns| ssys::mntns_id(ns.as_fd()));
    match id {
        Ok(mntns) => Peer::Namespace { uid, gid, mntns },
        Err(_) => unknown(Unknown::OldKernel),
    }
}

/// The `Pid:` line of a pidfd's fdinfo: the pid in the pid namespace of the
/// procfs at `proc_root`, 0 if not visible there, -1 once the process ended.
fn pidfd_pid(proc_root: &Path, fd: &OwnedFd) -> Option<i32> {
    let info = read_small(&proc_root.join("self/fdinfo").join(fd.as_raw_fd().to_string())).ok()?;
    info.lines().find_map(|l| l.strip_prefix("Pid:")).and_then(|v| v.trim().parse().ok())
}

/// Reads a small /proc file with one 4 KiB read where it fits: these files
/// report size 0, so `fs::read_to_string` stats them and then reads 32,
/// 32, 64, ... bytes at a time (five reads for a cgroup file), and three are
/// read on every node-socket connection.
fn read_small(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    loop {
        let m = f.read(&mut buf[n..])?;
        if m == 0 {
            break;
        }
        n += m;
        if n == buf.len() {
            buf.resize(n * 2, 0);
        }
    }
    buf.truncate(n);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

static WARNED: AtomicBool = AtomicBool::new(false);

fn warn_once(why: Unknown) {
    if WARNED.swap(true, Ordering::Relaxed) {
        return;
    }
    warn!(
        reason = why.text(),
        "node socket: a client cannot be told apart from others (it is outside the agent's pid namespace), \
         so each of its connections gets an instance of its own (no cache shared between them, bake targets on separate daemons). \
         Fix: run the agent with hostPID: true (the chart does), or give CI pods the CSI volume \
         (csi: {{driver: berth.dev}}), whose per-pod socket needs no identification. Logged once."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_merge_unknown_peers() {
        let a = Peer::Unknown { uid: 0, gid: 0, why: Unknown::HostPidNamespace };
        assert_eq!(a.key(), None, "an unidentified peer must not get a shared key");
        let n1 = Peer::Namespace { uid: 0, gid: 0, mntns: 7 };
        let n2 = Peer::Namespace { uid: 0, gid: 0, mntns: 8 };
        assert_ne!(n1.key(), n2.key());
        let c = Peer::Cgroup { uid: 1, gid: 1, pid: 5, cgroup: "0::/kubepods/p1/c1\n".into() };
        assert_eq!(c.key().unwrap(), "uid=1 gid=1 cgroup=0::/kubepods/p1/c1");
        assert_eq!(c.display(), "uid=1 pid=5 cgroup=/kubepods/p1/c1");
        let v1 = "12:pids:/a\n4:memory:/kubepods/p2\n";
        assert_eq!(shown_cgroup(v1), "/kubepods/p2");
    }

    /// Identification over a real socket pair in this process: the peer is
    /// ourselves, visible, so it is named by its cgroup.
    #[tokio::test]
    async fn a_visible_peer_is_named_by_its_cgroup() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = identify(&a, Path::new("/proc"));
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        assert_eq!(
            peer,
            Peer::Cgroup {
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
                pid: std::process::id() as i32,
                cgroup: own
            }
        );
    }
}
