//! Per-client bounds (invariant 6): one client's connection flood gets the
//! cap's RESOURCE_EXHAUSTED while its own other connections and every other
//! client are served; the queue's connections are capped; the agent runs
//! with its descriptor soft limit raised to the hard limit; and after the
//! flood closes the agent holds no more descriptors than before.

use berth_tests::harness::{fakeclient, poll_async, Agent};
use berth_tests::proto::fake::PingRequest;
use berth_tests::try_channel;
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;
use tokio::net::UnixStream;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

async fn ping_as(agent: &Agent, uid: u32, timeout: &str) -> Value {
    let mut cmd = fakeclient(agent.socket());
    cmd.args(["--timeout", timeout, "ping"]).uid(uid).gid(uid).stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

async fn ping_here(agent: &Agent) -> Result<(), tonic::Status> {
    let ch = try_channel(agent.socket()).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut c = berth_tests::proto::fake::fake_client::FakeClient::new(ch);
    c.ping(PingRequest::default()).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_the_cap_others_are_served_and_descriptors_come_back() {
    // A lowered soft limit, so the test fails unless the agent raises it.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 4096.min(hard), hard).unwrap();
    let agent = Agent::builder("bounds-flood")
        .args(["--max-builds", "2", "--max-client-connections", "8", "--socket-mode", "0666"])
        .args(["--idle-timeout", "1s", "--http-addr", "off"])
        .start_async()
        .await;
    let pid = agent.pid().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums, vec![hard, hard], "agent's RLIMIT_NOFILE not raised to the hard limit: {line}");
    let logged = agent
        .wait_log_async(0, |v| v["message"] == "descriptor limit (RLIMIT_NOFILE)", WAIT)
        .await
        .expect("limits logged");
    assert_eq!(logged["soft_was"], 4096.min(hard));
    assert_eq!(logged["hard"], hard);
    // The agent's spare disk images hold a descriptor each (see
    // agent/src/disk/spares.rs): the baseline counts them once made.
    agent.wait_log_async(0, |v| v["message"] == "disk spares ready", WAIT).await.expect("disk spares made");
    let baseline = fds(pid);

    // The flood: 8 connections held idle (they get the instance), then 200 more.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(try_channel(agent.socket()).await.unwrap());
    }
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(UnixStream::connect(agent.socket()).await.unwrap());
    }
    // A call on a connection past the cap: the cap's error, naming the client.
    let err = ping_here(&agent).await.expect_err("a connection past the cap was served");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--max-client-connections 8"), "{err:?}");
    assert!(err.message().contains("client uid=0 "), "{err:?}");
    assert!(err.message().contains("8/8 connections"), "{err:?}");
    // The client's own held connections are untouched...
    let mut c = berth_tests::proto::fake::fake_client::FakeClient::new(held[3].clone());
    c.ping(PingRequest::default()).await.expect("a held connection was disturbed");
    // ...and another client is served.
    let other = ping_as(&agent, 2401, "20").await;
    assert!(other.get("error").is_none(), "another client refused during the flood: {other}");

    drop(c);
    drop(held);
    drop(flood);
    // Refusals linger for at most 5 s; instances end after 1 s idle.
    let back = poll_async(WAIT, Duration::from_millis(200), || (fds(pid) <= baseline).then_some(())).await;
    assert!(back.is_some(), "agent descriptors {} > baseline {baseline} after the flood closed", fds(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_clients_hold_a_bounded_number_of_connections() {
    let agent = Agent::builder("bounds-queue")
        .args(["--max-builds", "1", "--socket-mode", "0666", "--http-addr", "off"])
        .args(["--queue-size", "4", "--max-queued-connections", "2", "--queue-timeout", "60s"])
        .start_async()
        .await;
    // uid 2501 holds the only slot.
    let mut cmd = fakeclient(agent.socket());
    cmd.args(["--timeout", "60", "stream", "4Mi", "64Ki", "45"]).uid(2501).gid(2501);
    let mut running = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    agent.wait_log_async(0, |v| v["message"] == "instance ready", WAIT).await.expect("instance ready");
    // This client queues two connections...
    let _q1 = UnixStream::connect(agent.socket()).await.unwrap();
    let _q2 = UnixStream::connect(agent.socket()).await.unwrap();
    // ...so its third (once those are in the queue) is refused with the cap.
    // An attempt made before them is queued itself; it gives up after 1 s.
    let mut refused = None;
    for _ in 0..20 {
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), ping_here(&agent)).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("the third queued connection was never refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-queued-connections 2"), "{e:?}");
    assert!(e.message().contains("2/2 connections"), "{e:?}");
    let _ = running.kill();
    let _ = running.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_is_a_flag_with_bounds() {
    let out = std::process::Command::new(berth_tests::harness::bin_path("berth-agent"))
        .args(["run", "--max-client-connections", "257"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--max-client-connections"), "{err}");
}
