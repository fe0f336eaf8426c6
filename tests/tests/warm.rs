//! The warm pool (`--warm N`): instances started ahead, one client each,
//! replaced in the background, counted in the slots, wiped on drain.

use berth_tests::harness::{ping_as, Agent};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn warm_ready(agent: &Agent) -> usize {
    // Started for the pool (the span's `warm` field), whether or not a client
    // claimed it before it was ready.
    agent.logs().iter().filter(|v| v["message"] == "instance ready" && v["warm"] == true).count()
}

fn wait_warm(agent: &Agent, n: usize) {
    let t0 = std::time::Instant::now();
    while warm_ready(agent) < n {
        assert!(t0.elapsed() < WAIT, "{} warm instances ready, want {n}:\n{}", warm_ready(agent), agent.log_tail(30));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn warm_instances_serve_one_client_each_and_are_replaced() {
    let agent = Agent::builder("warm-claim")
        .args(["--warm", "2", "--max-builds", "4", "--idle-timeout", "20s", "--socket-mode", "0666"])
        .args(["--http-addr", "127.0.0.1:0"])
        .start();
    wait_warm(&agent, 2);
    assert_eq!(agent.metric("berth_slots_in_use"), 2.0, "the pool holds slots");
    let a = ping_as(agent.socket(), 3101);
    let a2 = ping_as(agent.socket(), 3101);
    let b = ping_as(agent.socket(), 3102);
    assert!(a.get("error").is_none() && b.get("error").is_none(), "{a} {b}");
    assert_eq!(a["token"], a2["token"], "a claimed instance stays its client's");
    assert_ne!(a["token"], b["token"], "two clients, two warm instances");
    // The agent's log is read asynchronously: wait for both claim lines.
    let claims = || agent.logs().iter().filter(|v| v["message"] == "claimed a warm instance").count();
    let t0 = std::time::Instant::now();
    while claims() < 2 && t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(claims(), 2, "{}", agent.log_tail(30));
    // Replacements: the pool refills to 2 while slots allow (2 used + 2 warm = 4).
    wait_warm(&agent, 4);
    assert_eq!(agent.metric("berth_slots_in_use"), 4.0);
    // A claimed instance's start latency is not counted as a cold start.
    assert_eq!(agent.metric("berth_instance_start_seconds_count"), 0.0);
}

#[test]
fn the_pool_counts_inside_the_slots() {
    let agent = Agent::builder("warm-slots")
        .args(["--warm", "2", "--max-builds", "2", "--queue-size", "0", "--idle-timeout", "20s"])
        .args(["--socket-mode", "0666"])
        .start();
    wait_warm(&agent, 2);
    assert!(ping_as(agent.socket(), 3201).get("error").is_none());
    assert!(ping_as(agent.socket(), 3202).get("error").is_none());
    let c = ping_as(agent.socket(), 3203);
    assert_eq!(c["error"]["code"], "ResourceExhausted", "{c}");
    assert!(c["error"]["message"].as_str().unwrap().contains("2/2 builds running, queue full"), "{c}");
    // Nothing warm was started beyond the slots.
    assert_eq!(warm_ready(&agent), 2);
}

#[test]
fn unclaimed_warm_instances_are_wiped_on_drain() {
    let agent =
        Agent::builder("warm-drain").args(["--warm", "2", "--max-builds", "3", "--idle-timeout", "500ms"]).start();
    wait_warm(&agent, 2);
    agent.sigterm();
    let status = agent.wait_exit(WAIT).expect("agent exits");
    assert!(status.success());
    let ends = agent.instance_ends();
    assert_eq!(ends.len(), 2, "{ends:?}");
    assert!(ends.iter().all(|e| e["reason"] == "drain"), "{ends:?}");
    let leaks = agent.wait_clean(WAIT);
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[test]
fn a_warm_daemon_that_dies_is_not_handed_out() {
    let agent = Agent::builder("warm-dies")
        .args(["--warm", "1", "--max-builds", "2", "--idle-timeout", "20s", "--socket-mode", "0666"])
        .start();
    wait_warm(&agent, 1);
    // Kill the warm daemon behind the agent's back.
    let ready = agent.wait_log(|v| v["message"] == "instance ready", WAIT).unwrap();
    let id = ready["instance"].as_str().unwrap().to_string();
    let pid: i32 = std::fs::read_to_string(agent.state_dir().join("instances").join(&id).join("daemon.pid"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    agent.wait_log(|v| berth_tests::harness::is_instance_end(v) && v["instance"] == id.as_str(), WAIT).unwrap();
    let p = ping_as(agent.socket(), 3301);
    assert!(p.get("error").is_none(), "client got the dead warm instance: {p}");
}
