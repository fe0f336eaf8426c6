//! Warm sandboxes (`--warm N --warm-stage sandbox`): instances made ahead up
//! to their daemon's exec (namespaces, maps, cgroup, network, disk), whose
//! child waits before exec; a client's claim execs a fresh daemon in it.

use berth_tests::harness::{is_instance_end, ping_as, Agent};
use serde_json::Value;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn held_ids(agent: &Agent) -> Vec<String> {
    let held = agent.logs().into_iter().filter(|v| v["message"] == "sandbox held");
    held.filter_map(|v| v["instance"].as_str().map(String::from)).collect()
}

fn wait_held(agent: &Agent, n: usize) -> Vec<String> {
    let t0 = std::time::Instant::now();
    loop {
        let ids = held_ids(agent);
        if ids.len() >= n {
            return ids;
        }
        assert!(t0.elapsed() < WAIT, "{} sandboxes held, want {n}:\n{}", ids.len(), agent.log_tail(30));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn inst_dir(agent: &Agent, id: &str) -> PathBuf {
    agent.state_dir().join("instances").join(id)
}

/// The pid in an instance's daemon.pid (the held child, then the daemon).
fn daemon_pid(agent: &Agent, id: &str) -> i32 {
    let text = fs::read_to_string(inst_dir(agent, id).join("daemon.pid")).unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

fn exe_name(pid: i32) -> String {
    fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn a_claim_execs_a_fresh_daemon_in_the_sandbox_made_ahead() {
    let agent = Agent::builder("sandbox-claim")
        .args(["--warm", "1", "--warm-stage", "sandbox", "--max-builds", "3", "--idle-timeout", "20s"])
        .args(["--socket-mode", "0666", "--http-addr", "127.0.0.1:0"])
        .start();
    let id = wait_held(&agent, 1).remove(0);
    let pid = daemon_pid(&agent, &id);
    assert_eq!(agent.metric("berth_slots_in_use"), 1.0, "a sandbox holds its slot");
    assert_eq!(agent.metric("berth_warm_claims_total{stage=\"sandbox\"}"), 0.0);
    // Made ahead: the child is in the instance's namespaces, mapped, in its
    // cgroup, with its veth; but it is still the shim, no daemon ran.
    assert_eq!(exe_name(pid), "berth-shim", "the held child has not exec'd");
    let spec: Value = serde_json::from_slice(&fs::read(inst_dir(&agent, &id).join("spec.json")).unwrap()).unwrap();
    assert_eq!(spec["hold"], true, "{spec}");
    let ns = |p: String| fs::read_link(p).unwrap();
    let agent_pid = agent.agent_pid().expect("the agent runs");
    for kind in ["user", "pid", "mnt"] {
        assert_ne!(ns(format!("/proc/{pid}/ns/{kind}")), ns(format!("/proc/{agent_pid}/ns/{kind}")), "{kind}");
    }
    let uid_map = fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    assert_eq!(uid_map.split_whitespace().nth(1), spec["ids"]["host_base"].as_u64().map(|b| b.to_string()).as_deref());
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&format!("berth-{id}")), "in its cgroup while held: {cgroup}");
    // The test agents isolate builds (a subnet of their own, see netfix).
    assert!(spec["network"].is_object(), "{spec}");
    let dev = fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    assert!(dev.contains("eth0"), "its veth is in its namespace while held: {dev}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(exe_name(pid), "berth-shim", "still held");
    let log = fs::read_to_string(inst_dir(&agent, &id).join("daemon.log")).unwrap_or_default();
    assert!(log.is_empty(), "the daemon wrote before its claim: {log}");

    // A client claims it: the same pid execs the daemon, which answers.
    let a = ping_as(agent.socket(), 3401);
    assert!(a.get("error").is_none(), "{a}");
    assert_eq!(exe_name(pid), "fakekitd", "the sandbox's own child became the daemon");
    let ready = agent
        .wait_log(|v| v["message"] == "instance ready" && v["instance"] == id.as_str(), WAIT)
        .expect("the claimed sandbox's daemon is ready");
    assert_eq!(ready["steps"], "held=sandbox", "{ready}");
    assert!(agent.logs().iter().any(|v| v["message"] == "claimed a warm instance" && v["instance"] == id.as_str()));
    assert_eq!(agent.metric("berth_warm_claims_total{stage=\"sandbox\"}"), 1.0);
    assert_eq!(agent.metric("berth_sandbox_start_seconds_count"), 1.0);
    // Not a cold start.
    assert_eq!(agent.metric("berth_instance_start_seconds_count"), 0.0);
    // The claim goes on file after the daemon answers (off the start's path).
    let on_file = berth_tests::harness::poll(WAIT, Duration::from_millis(20), || {
        let spec: Value = serde_json::from_slice(&fs::read(inst_dir(&agent, &id).join("spec.json")).ok()?).ok()?;
        spec["client_key"].as_str().filter(|k| k.contains("3401")).map(|_| ())
    });
    assert!(on_file.is_some(), "the claim is on file");
    // The same client stays on it; the pool makes a new sandbox.
    let a2 = ping_as(agent.socket(), 3401);
    assert_eq!(a["token"], a2["token"], "a claimed sandbox stays its client's");
    let ids = wait_held(&agent, 2);
    assert_ne!(ids[1], id);
    assert_eq!(exe_name(daemon_pid(&agent, &ids[1])), "berth-shim");
}

#[test]
fn unclaimed_sandboxes_end_on_drain_without_a_daemon() {
    let agent = Agent::builder("sandbox-drain")
        .args(["--warm", "2", "--warm-stage", "sandbox", "--max-builds", "3", "--idle-timeout", "500ms"])
        .start();
    let ids = wait_held(&agent, 2);
    agent.sigterm();
    let status = agent.wait_exit(WAIT).expect("agent exits");
    assert!(status.success());
    let ends = agent.instance_ends();
    assert_eq!(ends.len(), 2, "{ends:?}");
    assert!(ends.iter().all(|e| e["reason"] == "drain"), "{ends:?}");
    let ready = agent.logs().into_iter().filter(|v| v["message"] == "instance ready").count();
    assert_eq!(ready, 0, "no daemon started for {ids:?}");
    let leaks = agent.wait_clean(WAIT);
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[test]
fn a_sandbox_whose_child_dies_is_not_handed_out_and_one_left_by_a_dead_agent_is_wiped() {
    let agent = Agent::builder("sandbox-dies")
        .args(["--warm", "1", "--warm-stage", "sandbox", "--max-builds", "2", "--idle-timeout", "20s"])
        .args(["--socket-mode", "0666"])
        .start();
    let id = wait_held(&agent, 1).remove(0);
    let pid = daemon_pid(&agent, &id);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    agent.wait_log(|v| is_instance_end(v) && v["instance"] == id.as_str(), WAIT).expect("the broken sandbox ends");
    let p = ping_as(agent.socket(), 3501);
    assert!(p.get("error").is_none(), "client got the dead sandbox: {p}");
    let claimed: Vec<Value> = agent.logs().into_iter().filter(|v| v["message"] == "claimed a warm instance").collect();
    assert!(claimed.iter().all(|v| v["instance"] != id.as_str()), "{claimed:?}");

    // The agent dies with a sandbox held: its shim takes the lifeline's end
    // and wipes the sandbox; nothing is left for a sweep.
    let held = wait_held(&agent, 2);
    let last = held.last().unwrap().clone();
    let pid = daemon_pid(&agent, &last);
    agent.sigkill();
    let leaks = agent.wait_clean(WAIT);
    assert!(leaks.is_empty(), "{leaks:?}");
    assert!(!inst_dir(&agent, &last).exists());
    assert!(fs::metadata(format!("/proc/{pid}")).is_err(), "the held child {pid} is gone");
}

#[test]
fn a_holding_shim_killed_leaves_nothing_and_the_pool_makes_another() {
    let agent = Agent::builder("sandbox-shimkill")
        .args(["--warm", "1", "--warm-stage", "sandbox", "--max-builds", "2", "--idle-timeout", "20s"])
        .start();
    let id = wait_held(&agent, 1).remove(0);
    let child = daemon_pid(&agent, &id);
    let text = fs::read_to_string(inst_dir(&agent, &id).join(berth_shim::spec::SHIM_PID_FILE)).unwrap();
    let shim: i32 = text.split_whitespace().next().unwrap().parse().unwrap();
    // The shim dies without its teardown: its held child takes the handshake
    // socket's end and exits; the agent deletes the sandbox from its files.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::Signal::SIGKILL).unwrap();
    agent.wait_log(|v| is_instance_end(v) && v["instance"] == id.as_str(), WAIT).expect("the sandbox ends");
    let gone = berth_tests::harness::poll(WAIT, Duration::from_millis(20), || {
        fs::metadata(format!("/proc/{child}")).is_err().then_some(())
    });
    assert!(gone.is_some(), "the held child {child} outlived its shim");
    assert!(!inst_dir(&agent, &id).exists(), "the sandbox's dir is deleted");
    // The pool makes a new one; the drain then leaves nothing.
    wait_held(&agent, 2);
    agent.sigterm();
    agent.wait_exit(WAIT).expect("agent exits");
    let leaks = agent.wait_clean(WAIT);
    assert!(leaks.is_empty(), "{leaks:?}");
}
