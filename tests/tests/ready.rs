//! Readiness (issue 15, item 3): each daemon gets a NOTIFY_SOCKET of its
//! instance, and `READY=1` there is ready; the gRPC probe stays as the
//! fallback for daemons that never notify; the start timeout still holds.
//!
//! Which path won is told by ORDER, not time: fakekitd's `--health-delay`
//! keeps grpc.health.v1 at NOT_SERVING (so the probe cannot say ready) while
//! READY=1 is sent at once. An instance ready under that delay can only have
//! been found by the notification.

use berth_tests::harness::{fakeclient, run_fakeclient, Agent};
use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn metrics(agent: &Agent) -> String {
    use std::io::{Read, Write};
    let addr = agent.http_addr(WAIT).expect("http address");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn ready_via(agent: &Agent, via: &str) -> f64 {
    let name = format!("berth_instance_ready_total{{via=\"{via}\"}}");
    let body = metrics(agent);
    body.lines()
        .find_map(|l| l.strip_prefix(name.as_str()).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
}

fn agent(name: &str, daemon_args: &[&str], extra: &[&str]) -> Agent {
    let mut b =
        Agent::builder(name).args(["--max-builds", "2", "--http-addr", "127.0.0.1:0"]).args(extra.iter().copied());
    for a in daemon_args {
        b = b.daemon_arg(a);
    }
    b.start()
}

fn ready_line(agent: &Agent) -> Value {
    agent
        .wait_log(|v| v["message"] == "instance ready", WAIT)
        .unwrap_or_else(|| panic!("no ready line:\n{}", agent.log_tail(40)))
}

/// The inode of the unix socket bound at `path`, from /proc/net/unix.
fn socket_inode(path: &Path) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 8 && Path::new(f[7]) == path).then(|| f[6].parse().ok()).flatten()
    })
}

/// The path a unix socket inode is bound to, from /proc/net/unix.
fn socket_inode_path(ino: u64) -> Option<PathBuf> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 8 && f[6].parse::<u64>().ok() == Some(ino)).then(|| PathBuf::from(f[7]))
    })
}

/// The socket inodes among `pid`'s descriptors.
fn socket_fds(pid: u32) -> Vec<u64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if let Ok(t) = std::fs::read_link(e.path()) {
            let t = t.to_string_lossy().to_string();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                out.push(n.parse().unwrap());
            }
        }
    }
    out
}

#[test]
fn ready_by_notification_before_the_probe_could_answer() {
    // Health says NOT_SERVING for 10 minutes: only READY=1 can start this
    // instance within the 20 s start timeout.
    let agent = agent("ready-notify", &["--health-delay=600s"], &["--start-timeout", "20s", "--idle-timeout", "60s"]);
    let r = run_fakeclient(agent.socket(), &["--timeout", "25", "ping"]);
    assert!(r.ok(), "ping failed: {:?}\n{}", r.json, agent.log_tail(40));
    let line = ready_line(&agent);
    assert_eq!(line["via"], "notify", "{line}");
    // The order: the client was served while the daemon's health service
    // still answers NOT_SERVING, i.e. before any probe could say ready.
    let h = run_fakeclient(agent.socket(), &["--timeout", "10", "health"]);
    assert_eq!(h.json["status"], "NOT_SERVING", "{:?}", h.json);
    assert_eq!(ready_via(&agent, "notify"), 1.0);
    assert_eq!(ready_via(&agent, "probe"), 0.0);

    // The socket: in the instance dir, the mapped root's, 0600; the agent
    // holds no descriptor of it once the instance is ready.
    let id = line["instance"].as_str().expect("instance on the ready line").to_string();
    let inst_dir: PathBuf = agent.state_dir().join("instances").join(&id);
    let sock = inst_dir.join("notify.sock");
    let md = std::fs::symlink_metadata(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    let (base, _) = agent.idmap();
    assert!(md.uid() >= base && md.uid() != 0, "owned by the mapped root, not {}", md.uid());
    // Closed: no process has it bound any more (the kernel's table of
    // unix sockets lists a bound one by path until its last descriptor
    // closes), and the agent holds no unbound leftover either.
    let pid = agent.agent_pid().expect("agent pid");
    assert_eq!(socket_inode(&sock), None, "the agent still holds the notify socket of a ready instance");
    assert!(socket_fds(pid).iter().all(|i| socket_inode_path(*i).as_deref() != Some(sock.as_path())));

    // SIGKILL + restart: the sweep takes the socket with the instance dir.
    agent.sigkill();
    assert!(agent.wait_exit(Duration::from_secs(5)).is_some(), "agent survived SIGKILL");
    agent.restart();
    let leaks = agent.wait_clean(WAIT);
    assert!(leaks.is_empty(), "leftovers: {leaks:?}\n{}", agent.log_tail(40));
    assert!(!sock.exists() && !inst_dir.exists(), "{} left behind", sock.display());
}

#[test]
fn a_daemon_that_never_notifies_is_found_by_the_probe() {
    let agent = agent("ready-probe", &["--no-notify"], &["--idle-timeout", "1s"]);
    let r = run_fakeclient(agent.socket(), &["--timeout", "25", "ping"]);
    assert!(r.ok(), "ping failed: {:?}\n{}", r.json, agent.log_tail(40));
    assert_eq!(ready_line(&agent)["via"], "probe");
    assert_eq!(ready_via(&agent, "probe"), 1.0);
    assert_eq!(ready_via(&agent, "notify"), 0.0);
    // A normal end (idle) removes the socket with the instance.
    agent
        .wait_log(berth_tests::harness::is_instance_end, WAIT)
        .unwrap_or_else(|| panic!("the instance did not end idle:\n{}", agent.log_tail(40)));
    let leaks = agent.wait_clean(WAIT);
    assert!(leaks.is_empty(), "leftovers: {leaks:?}\n{}", agent.log_tail(40));
    let left: Vec<_> = std::fs::read_dir(agent.state_dir().join("instances"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "instance dirs left: {left:?}");
}

#[test]
fn without_either_signal_the_start_timeout_still_holds() {
    // No READY=1 and a health service that will not say SERVING in time.
    let agent = agent("ready-timeout", &["--no-notify", "--health-delay=600s"], &["--start-timeout", "2s"]);
    let mut cmd = fakeclient(agent.socket());
    cmd.args(["--timeout", "25", "ping"]);
    let out = cmd.output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let msg = v["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("did not answer on its socket within"), "{v}\n{}", agent.log_tail(40));
    assert_eq!(ready_via(&agent, "notify") + ready_via(&agent, "probe"), 0.0);
    let leaks = agent.wait_clean(WAIT);
    assert!(leaks.is_empty(), "leftovers: {leaks:?}\n{}", agent.log_tail(40));
}
