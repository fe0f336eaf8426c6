//! Admission: build slots, the FIFO queue, clear RESOURCE_EXHAUSTED errors
//! through a real gRPC client, queued clients that hang up, and /metrics.

use berth_tests::harness::{fakeclient, Agent};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

fn agent(name: &str, extra: &[&str]) -> Agent {
    Agent::builder(name)
        .args(["--max-builds", "1", "--socket-mode", "0666", "--http-addr", "127.0.0.1:0"])
        .args(extra.iter().copied())
        .start()
}

fn client(agent: &Agent, uid: u32, args: &[&str]) -> Child {
    let mut cmd = fakeclient(agent.socket());
    cmd.args(args).uid(uid).gid(uid).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

fn output(mut child: Child) -> Value {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < WAIT, "client hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    serde_json::from_str(out.lines().last().unwrap_or("null")).unwrap_or(Value::Null)
}

/// Parses the Prometheus text format: `name{labels} value` lines.
fn metrics(agent: &Agent) -> HashMap<String, f64> {
    let addr = agent.http_addr(WAIT).expect("http address");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let body = raw.split("\r\n\r\n").nth(1).expect("http body");
    let mut out = HashMap::new();
    for line in body.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in {line:?}"));
        assert!(name.starts_with("berth_"), "unprefixed metric {name}");
        if let Some((_, labels)) = name.split_once('{') {
            assert!(labels.ends_with('}') && labels.contains("=\""), "bad labels in {line:?}");
        }
        out.insert(name.to_string(), v);
    }
    out
}

fn wait_metric(agent: &Agent, name: &str, want: f64) {
    let t0 = Instant::now();
    loop {
        let got = metrics(agent).get(name).copied();
        if got == Some(want) {
            return;
        }
        assert!(t0.elapsed() < WAIT, "{name} is {got:?}, want {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ready_order(agent: &Agent) -> Vec<String> {
    agent
        .logs()
        .iter()
        .filter(|v| v["message"] == "instance ready")
        .map(|v| v["client"].as_str().unwrap_or("").split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn the_queue_is_fifo_bounded_and_says_why() {
    let agent = agent("adm-fifo", &["--queue-size", "2", "--idle-timeout", "200ms"]);
    let holder = client(&agent, 4001, &["--timeout", "2", "hang"]);
    wait_metric(&agent, "berth_slots_in_use", 1.0);
    let b = client(&agent, 4002, &["--timeout", "20", "ping"]);
    wait_metric(&agent, "berth_queue_depth", 1.0);
    let c = client(&agent, 4003, &["--timeout", "20", "ping"]);
    wait_metric(&agent, "berth_queue_depth", 2.0);
    // The queue is full: the next new client is told so, at once.
    // At once: not after queueing until its own 20s timeout (that would
    // end in DeadlineExceeded, not ResourceExhausted).
    let t0 = Instant::now();
    let d = output(client(&agent, 4004, &["--timeout", "20", "ping"]));
    assert!(t0.elapsed() < Duration::from_secs(20), "queued until the client's timeout: {:?}", t0.elapsed());
    assert_eq!(d["error"]["code"], "ResourceExhausted", "{d}");
    let msg = d["error"]["message"].as_str().unwrap();
    assert!(msg.contains("1/1 builds running, queue full") && msg.contains("node "), "{msg}");

    let _ = output(holder);
    let (b, c) = (output(b), output(c));
    assert!(b.get("error").is_none() && c.get("error").is_none(), "{b} {c}");
    assert_eq!(ready_order(&agent), vec!["uid=4001", "uid=4002", "uid=4003"], "served in arrival order");
    let m = metrics(&agent);
    assert_eq!(m["berth_connections_refused_total{reason=\"exhausted\"}"], 1.0);
    assert_eq!(m["berth_queue_depth"], 0.0);
}

#[test]
fn queue_timeout_and_no_queue() {
    let agent = agent("adm-timeout", &["--queue-size", "4", "--queue-timeout", "500ms", "--idle-timeout", "200ms"]);
    let holder = client(&agent, 4101, &["--timeout", "3", "hang"]);
    wait_metric(&agent, "berth_slots_in_use", 1.0);
    let e = output(client(&agent, 4102, &["--timeout", "20", "ping"]));
    assert_eq!(e["error"]["code"], "ResourceExhausted", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("timed out after 500ms in the queue"), "{e}");
    let _ = output(holder);

    let agent = self::agent("adm-noqueue", &["--queue-size", "0", "--idle-timeout", "200ms"]);
    let holder = client(&agent, 4201, &["--timeout", "2", "hang"]);
    wait_metric(&agent, "berth_slots_in_use", 1.0);
    let f = output(client(&agent, 4202, &["--timeout", "20", "ping"]));
    assert!(f["error"]["message"].as_str().unwrap().contains("queue full"), "{f}");
    let _ = output(holder);
}

#[test]
fn a_client_that_hangs_up_leaves_the_queue() {
    let agent = agent("adm-hangup", &["--queue-size", "1", "--idle-timeout", "200ms"]);
    let holder = client(&agent, 4301, &["--timeout", "6", "hang"]);
    wait_metric(&agent, "berth_slots_in_use", 1.0);
    let mut quitter = client(&agent, 4302, &["--timeout", "20", "ping"]);
    wait_metric(&agent, "berth_queue_depth", 1.0);
    quitter.kill().unwrap();
    let _ = quitter.wait();
    // Gone from the queue within the hang-up poll, long before the holder ends.
    wait_metric(&agent, "berth_queue_depth", 0.0);
    let next = client(&agent, 4303, &["--timeout", "20", "ping"]);
    wait_metric(&agent, "berth_queue_depth", 1.0);
    let _ = output(holder);
    assert!(output(next).get("error").is_none());
    assert!(!ready_order(&agent).contains(&"uid=4302".to_string()), "the quitter got an instance");
    assert_eq!(metrics(&agent)["berth_connections_refused_total{reason=\"client_gone\"}"], 1.0);
}

#[test]
fn metrics_parse_and_move_after_a_build() {
    let agent = agent("adm-metrics", &["--idle-timeout", "200ms"]);
    let before = metrics(&agent);
    assert_eq!(before["berth_slots"], 1.0);
    assert_eq!(before["berth_instances_ended_total{reason=\"idle\"}"], 0.0);
    let out = output(client(&agent, 4401, &["--timeout", "20", "stream", "1Mi", "64Ki", "0"]));
    assert_eq!(out["ok"], true, "{out}");
    wait_metric(&agent, "berth_instances_ended_total{reason=\"idle\"}", 1.0);
    let after = metrics(&agent);
    assert_eq!(after["berth_instance_start_seconds_count"], 1.0);
    assert_eq!(after["berth_build_duration_seconds_count"], 1.0);
    assert_eq!(after["berth_instance_peak_memory_bytes_count"], 1.0);
    assert!(after["berth_proxied_bytes_total{direction=\"down\"}"] >= (1 << 20) as f64, "{after:?}");
    assert!(after["berth_proxied_bytes_total{direction=\"up\"}"] > 0.0);
    assert_eq!(after["berth_slots_in_use"], 0.0);
    // No label carries a pod or instance name: every label value is bounded.
    for name in after.keys() {
        assert!(!name.contains("uid=") && !name.contains("instance="), "{name}");
    }
}
