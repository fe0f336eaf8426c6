//! The counter against real namespaces: this test process plays the daemon
//! (it accepts, so its own pid goes in `daemon.pid`), and clients connect
//! from threads that moved into network namespaces of their own, as a pod's
//! processes are. Runs as root (unshare, pidfd_getfd, SIOCGSKNS).

use super::*;
use std::os::unix::net::{UnixListener, UnixStream};

/// A connection to `path` made from a fresh network namespace (a thread
/// that unshares it, connects and ends; the socket keeps the namespace).
fn connect_from_own_netns(path: &Path) -> UnixStream {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
        UnixStream::connect(&path).expect("connect")
    })
    .join()
    .unwrap()
}

struct Setup {
    _t: tempfile::TempDir,
    listener: UnixListener,
    file: SocketFile,
    counter: Counter,
}

fn setup() -> Setup {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("buildkitd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let file = SocketFile::of(&path).unwrap();
    let proc_root = Path::new("/proc");
    let me = std::process::id() as i32;
    let stamp = PidStamp::of(proc_root, me).unwrap();
    std::fs::write(t.path().join(DAEMON_PID_FILE), stamp.render()).unwrap();
    let counter = Counter::new(listener.as_fd(), file, t.path(), proc_root).unwrap();
    Setup { _t: t, listener, file, counter }
}

#[test]
fn counts_a_pods_connections_in_its_own_network_namespace() {
    let mut s = setup();
    let path = s.counter.name.clone();
    let c1 = connect_from_own_netns(&path);
    // Waiting in the backlog: seen on the listener, in this namespace.
    assert_eq!(s.counter.count().unwrap(), 1);
    let (a1, _) = s.listener.accept().unwrap();
    // Accepted: out of this namespace's table; the old count misses it.
    assert_eq!(diag::count(s.file).unwrap(), 0, "the accepted end lives in the client's namespace");
    assert_eq!(s.counter.count().unwrap(), 1, "found in the pod's namespace");
    assert_eq!(s.counter.foreign_namespaces(), 1);
    // A second connection of the same namespace: no new lookup needed.
    let c2 = {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let c1_ns = ssys::socket_netns(c1.as_fd()).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&c1_ns, CloneFlags::CLONE_NEWNET).unwrap();
            tx.send(UnixStream::connect(&p).unwrap()).unwrap();
        });
        rx.recv().unwrap()
    };
    let (a2, _) = s.listener.accept().unwrap();
    assert_eq!(s.counter.count().unwrap(), 2);
    assert_eq!(s.counter.foreign_namespaces(), 1);
    drop((c1, a1));
    assert_eq!(s.counter.count().unwrap(), 1);
    drop((c2, a2));
    assert_eq!(s.counter.count().unwrap(), 0, "idle once the pod's connections are gone");
}

#[test]
fn counts_connections_of_the_agents_namespace_and_of_two_pods() {
    let mut s = setup();
    let path = s.counter.name.clone();
    // hostNetwork: the agent's own namespace, no lookup.
    let host = UnixStream::connect(&path).unwrap();
    let (host_a, _) = s.listener.accept().unwrap();
    assert_eq!(s.counter.count().unwrap(), 1);
    assert_eq!(s.counter.foreign_namespaces(), 0);
    drop((host, host_a));
    // Two namespaces at once (found when the count falls to zero).
    let (p1, p2) = (connect_from_own_netns(&path), connect_from_own_netns(&path));
    let accepted = (s.listener.accept().unwrap(), s.listener.accept().unwrap());
    assert_eq!(s.counter.count().unwrap(), 2);
    assert_eq!(s.counter.foreign_namespaces(), 2);
    // Other sockets of the "daemon" (this process) are never counted.
    let other = tempfile::tempdir().unwrap();
    let _l2 = UnixListener::bind(other.path().join("x.sock")).unwrap();
    let _c3 = connect_from_own_netns(&other.path().join("x.sock"));
    assert_eq!(s.counter.count().unwrap(), 2);
    drop((p1, p2, accepted));
    assert_eq!(s.counter.count().unwrap(), 0);
}

#[test]
fn a_missing_daemon_record_finds_nothing_and_fails_nothing() {
    let mut s = setup();
    std::fs::remove_file(s.counter.pid_file.clone()).unwrap();
    let path = s.counter.name.clone();
    let _c = connect_from_own_netns(&path);
    let _a = s.listener.accept().unwrap();
    // Before the shim records the daemon there is nothing to look in.
    assert_eq!(s.counter.count().unwrap(), 0);
}

#[test]
fn every_count_error_has_a_pre_created_metric_label() {
    let io = || io::Error::from(io::ErrorKind::PermissionDenied);
    let all = [
        CountError::Listener { name: "l".into(), source: io() },
        CountError::SockDiag { ns: "agent's", source: io() },
        CountError::DaemonFds { path: "/proc/1/fd/3".into(), source: io() },
        CountError::Getfd { pid: 1, fd: 3, source: Errno::EPERM },
        CountError::Netns { what: "setns".into(), source: io() },
        CountError::Task("panicked".into()),
    ];
    let labels: HashSet<&str> = all.iter().map(CountError::metric_label).collect();
    assert_eq!(labels.len(), all.len(), "one label per kind");
    for l in labels {
        assert!(crate::metrics::HANDOFF_COUNT_REASONS.contains(&l), "{l} is not pre-created on /metrics");
    }
    // The errors carry where they happened.
    assert!(all[2].to_string().contains("/proc/1/fd/3") && all[2].to_string().contains("ptrace"));
    assert!(all[3].to_string().contains("pid 1") && all[3].to_string().contains("CAP_SYS_PTRACE"));
}
