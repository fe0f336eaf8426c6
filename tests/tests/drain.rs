//! Never kill a build: drain on SIGTERM, hand over to a second agent on the
//! same node, and recover from a crash. A long fakekitd Stream is the build;
//! its checksum proves it completed intact.
//!
//! Runs on this machine's cgroup v1 and in the cgroup v2 VM lane. The
//! harness's waits stretch with the time scale on their own; the suite's own
//! loops, idle timeouts and client timeouts go through `scaled` here.

use berth_tests::harness::{cgroup_parent_dirs, fakeclient, scaled, scaled_flag, scaled_secs, Agent, AgentBuilder};
use serde_json::Value;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A bound on the harness's waits (which stretch it with the time scale).
const WAIT: Duration = Duration::from_secs(30);

fn agent(name: &str, extra: &[&str]) -> AgentBuilder {
    let idle = scaled_flag("500ms");
    let mut b = Agent::builder(name).args(["--max-builds", "4", "--idle-timeout", &idle, "--socket-mode", "0666"]);
    for a in extra {
        b = b.arg(a);
    }
    b
}

/// A ~3 s stream of 4 MiB as a separate client process of `uid`.
fn start_stream(socket: &std::path::Path, uid: u32) -> Child {
    let mut cmd = fakeclient(socket);
    cmd.args(["--timeout", &scaled_secs(60), "stream", "4Mi", "64Ki", "45"]).uid(uid).gid(uid);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

/// The client's JSON result, once it exits within `limit` (stretched by the
/// time scale).
fn finish(mut child: Child, limit: Duration) -> Value {
    let limit = scaled(limit);
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let mut out = String::new();
            child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            return out.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("client still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ping_as(socket: &std::path::Path, uid: u32) -> Value {
    let mut cmd = fakeclient(socket);
    cmd.args(["--timeout", &scaled_secs(20), "ping"]).uid(uid).gid(uid);
    let out = cmd.output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn wait_streaming(agent: &Agent) {
    agent
        .wait_log(|v| v["message"] == "instance ready", WAIT)
        .unwrap_or_else(|| panic!("no instance ready:\n{}", agent.log_tail(30)));
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn sigterm_mid_stream_completes_refuses_new_clients_and_exits_zero() {
    let agent = agent("drain-term", &[]).start();
    let stream = start_stream(agent.socket(), 2001);
    wait_streaming(&agent);
    agent.sigterm();
    agent.wait_log(|v| v["message"].as_str().is_some_and(|m| m.starts_with("draining")), WAIT).expect("drain logged");

    // A new client is refused with the draining message...
    let refused = ping_as(agent.socket(), 2002);
    assert_eq!(refused["error"]["code"], "Unavailable", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("draining"), "{refused}");
    // ...while the running client's new connections are still served.
    let again = ping_as(agent.socket(), 2001);
    assert!(again.get("error").is_none(), "running client refused during drain: {again}");

    let done = finish(stream, WAIT);
    assert_eq!(done["ok"], true, "stream not intact: {done}");
    assert_eq!(done["bytes"], 4 * 1024 * 1024);
    let status = agent.wait_exit(WAIT).expect("agent exits after its clients are done");
    assert!(status.success(), "exit status {status:?}");
    let end = agent.instance_ends();
    assert_eq!(end.len(), 1, "{end:?}");
    assert_eq!(end[0]["reason"], "idle", "the build ended on its own, not by drain");
    let leaks = agent.wait_clean(WAIT);
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[test]
fn second_agent_takes_new_clients_while_the_first_finishes() {
    let first = agent("drain-handover", &[]).start();
    let stream = start_stream(first.socket(), 2101);
    wait_streaming(&first);
    let old_instance = first.wait_log(|v| v["message"] == "instance ready", WAIT).unwrap()["instance"].clone();

    // The rollout: the new agent starts beside the old one, then the old
    // one gets SIGTERM.
    let second = first.spawn_sibling();
    second.wait_log(|v| v["message"] == "listening", WAIT).expect("second agent listens");
    let sweep = second.wait_log(|v| v["message"] == "start-up sweep done", WAIT).unwrap();
    assert_eq!(sweep["instances"], 0, "the new agent swept the old one's live instance: {sweep}");
    assert_eq!(sweep["skipped"], 1, "{sweep}");
    first.sigterm();

    // The next new client reaches the second agent.
    let pong = ping_as(first.socket(), 2102);
    assert!(pong.get("error").is_none(), "{pong}");
    let ready =
        second.wait_log(|v| v["message"] == "instance ready", WAIT).expect("second agent served the new client");
    assert_ne!(ready["instance"], old_instance);

    let done = finish(stream, WAIT);
    assert_eq!(done["ok"], true, "old client's stream broken by the handover: {done}");
    let status = first.wait_exit(WAIT).expect("first agent exits once drained");
    assert!(status.success());
    // The first agent's exit did not remove the socket the second one serves.
    let pong = ping_as(first.socket(), 2103);
    assert!(pong.get("error").is_none(), "socket lost after the old agent exited: {pong}");
    second.sigterm();
    assert!(second.wait_exit(WAIT).expect("second exits").success());
    let leaks = first.wait_clean(WAIT);
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[test]
fn drain_timeout_forces_the_cleanup() {
    let agent = agent("drain-timeout", &["--drain-timeout", "1s"]).start();
    let mut hang = fakeclient(agent.socket());
    hang.args(["--timeout", &scaled_secs(60), "hang"])
        .uid(2201)
        .gid(2201)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let hang = hang.spawn().unwrap();
    wait_streaming(&agent);
    let t0 = Instant::now();
    agent.sigterm();
    let status = agent.wait_exit(WAIT).expect("agent exits at the drain timeout");
    assert!(status.success());
    assert!(t0.elapsed() >= Duration::from_secs(1), "exited before the drain timeout");
    let end = agent.instance_ends();
    assert_eq!(end.len(), 1);
    assert_eq!(end[0]["reason"], "drain", "{:?}", end[0]);
    let out = finish(hang, WAIT);
    assert!(out.get("error").is_some(), "the hung client was told: {out}");
    let leaks = agent.wait_clean(WAIT);
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[test]
fn second_sigterm_means_now() {
    let agent = agent("drain-twice", &[]).start();
    let stream = start_stream(agent.socket(), 2301);
    wait_streaming(&agent);
    agent.sigterm();
    agent.wait_log(|v| v["message"].as_str().is_some_and(|m| m.starts_with("draining")), WAIT).unwrap();
    agent.sigterm();
    let status = agent.wait_exit(WAIT).expect("exits on the second SIGTERM");
    assert!(status.success());
    let out = finish(stream, WAIT);
    assert_ne!(out["ok"], true, "the stream cannot have completed: {out}");
    assert_eq!(agent.instance_ends()[0]["reason"], "drain");
    let leaks = agent.wait_clean(WAIT);
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[test]
fn readyz_goes_unready_while_draining() {
    let agent = agent("drain-readyz", &[]).arg("--http-addr").arg("127.0.0.1:0").start();
    let addr = agent.http_addr(WAIT).expect("http address logged");
    let get = |path: &str| -> (u16, String) {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        (out.split_whitespace().nth(1).unwrap().parse().unwrap(), out)
    };
    assert_eq!(get("/healthz").0, 200);
    assert_eq!(get("/readyz").0, 200);
    let stream = start_stream(agent.socket(), 2401);
    wait_streaming(&agent);
    agent.sigterm();
    agent.wait_log(|v| v["message"].as_str().is_some_and(|m| m.starts_with("draining")), WAIT).unwrap();
    let (code, body) = get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"));
    assert_eq!(get("/healthz").0, 200, "alive while draining");
    assert_eq!(finish(stream, WAIT)["ok"], true);
    assert!(agent.wait_exit(WAIT).unwrap().success());
}

#[test]
fn a_second_agent_with_another_state_dir_never_kills_the_firsts_instances() {
    // Both agents nest instances under one cgroup parent but keep separate
    // state dirs: the second one's sweep must not take the first one's
    // live instance for a leftover.
    let shared = format!("berth-test/shared-{}", std::process::id());
    // Removes the shared parent even when an assertion fails: neither
    // agent's harness owns it. On v1 one dir per hierarchy, on v2 one.
    struct Shared(String);
    impl Drop for Shared {
        fn drop(&mut self) {
            for dir in cgroup_parent_dirs(std::path::Path::new("/sys/fs/cgroup"), &self.0) {
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten().filter(|e| e.path().is_dir()) {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
    let _cleanup = Shared(shared.clone());
    // The first agent's instance must outlive the second agent's start.
    let idle = scaled_flag("10s");
    let first = agent("sweep-foreign-a", &["--cgroup-parent", &shared, "--idle-timeout", &idle]).start();
    let before = ping_as(first.socket(), 2501);
    assert!(before.get("error").is_none(), "{before}");
    let second = agent("sweep-foreign-b", &["--cgroup-parent", &shared]).start();
    let sweep = second.wait_log(|v| v["message"] == "start-up sweep done", WAIT).unwrap();
    assert!(sweep["foreign"].as_u64().unwrap() >= 1, "one per controller hierarchy: {sweep}");
    assert_eq!(sweep["cgroups"], 0, "{sweep}");
    let after = ping_as(first.socket(), 2501);
    assert_eq!(after["token"], before["token"], "the first agent's instance was killed: {after}");
    drop(second);
    first.sigterm();
    first.wait_exit(WAIT);
}

#[test]
fn the_sweep_empties_trash_a_dead_shim_left() {
    // A shim killed while emptying its trash entry leaves it behind: files
    // of an ended instance, owned by its uids, with a mode-000 dir inside.
    let a = agent("sweep-trash", &[]).start();
    a.sigkill();
    a.wait_exit(WAIT);
    let trash = a.state_dir().join("instances/.trash-0123456789ab");
    std::fs::create_dir_all(trash.join("root/locked")).unwrap();
    std::fs::write(trash.join("root/locked/blob"), vec![7u8; 4096]).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", trash.join("root/link")).unwrap();
    std::fs::set_permissions(trash.join("root/locked"), std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let mark = a.log_mark();
    a.restart();
    let sweep = a.wait_log_since(mark, |v| v["message"] == "start-up sweep done", WAIT).unwrap();
    assert_eq!(sweep["trash"], 1, "{sweep}");
    assert!(!trash.exists());
    assert!(std::path::Path::new("/etc/hostname").exists(), "the symlink's target survives");
    let leaks = a.wait_clean(WAIT);
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[test]
fn a_dead_agents_fresh_lease_is_swept_at_once() {
    // A crash between the wipe's rename and the lease's release leaves a
    // lease naming an instance without a dir and a dead owner: stale at
    // once, however young. One of a live owner is kept.
    let a = agent("sweep-lease", &[]).start();
    let (base, _) = a.idmap();
    a.sigkill();
    a.wait_exit(WAIT);
    let leases = a.state_dir().join("leases");
    std::fs::write(leases.join(base.to_string()), "0123456789ab agent-1-deadbeef0000").unwrap();
    let other = std::fs::File::create(a.dir().join("other.lock")).unwrap();
    let held = nix::fcntl::Flock::lock(other, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    let kept_owner = "agent-2-livelivelive";
    std::fs::rename(a.dir().join("other.lock"), a.state_dir().join(format!("agents/{kept_owner}.lock"))).unwrap();
    std::fs::write(leases.join((base + 65536).to_string()), format!("ba9876543210 {kept_owner}")).unwrap();
    let mark = a.log_mark();
    a.restart();
    let sweep = a.wait_log_since(mark, |v| v["message"] == "start-up sweep done", WAIT).unwrap();
    assert_eq!(sweep["leases"], 1, "{sweep}");
    assert!(!leases.join(base.to_string()).exists(), "the dead owner's young lease is gone");
    assert!(leases.join((base + 65536).to_string()).exists(), "a live owner's lease is kept");
    drop(held);
    std::fs::remove_file(leases.join((base + 65536).to_string())).unwrap();
}
