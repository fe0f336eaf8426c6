//! What real BuildKit clients depend on, checked with fakekitd: readiness by
//! grpc.health.v1 or, for daemons without it, Control.ListWorkers;
//! connections that arrive while the instance starts are held and served;
//! every runtime path of an instance is its own.

use berth_tests::harness::{fakeclient, Agent};
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

fn run(agent: &Agent, uid: u32, args: &[&str]) -> Child {
    let mut cmd = fakeclient(agent.socket());
    cmd.arg("--timeout").arg("30").args(args).uid(uid).gid(uid);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

fn json(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[test]
fn connections_during_start_are_held_and_served() {
    // The socket appears at once, the daemon serves only 1.5 s later, as
    // the real buildkitd's socket appears before it serves.
    let agent = Agent::builder("bk-held")
        .args(["--max-builds", "2", "--idle-timeout", "2s", "--socket-mode", "0666"])
        .daemon_arg("--socket-early")
        .daemon_arg("--start-delay=1500")
        .start();
    let t0 = Instant::now();
    // A bootstrap-like burst: Info, ListWorkers and pings, separate processes.
    let kids: Vec<Child> =
        ["info", "workers", "ping", "ping", "health"].iter().map(|c| run(&agent, 5001, &[c])).collect();
    let outs: Vec<Value> = kids.into_iter().map(json).collect();
    assert!(t0.elapsed() >= Duration::from_millis(1400), "served before the daemon could answer");
    for o in &outs {
        assert!(o.get("error").is_none(), "a held connection was refused: {o}");
    }
    assert_eq!(outs[2]["token"], outs[3]["token"]);
    let workers = outs[1].to_string();
    assert!(workers.contains("fake"), "{workers}");
    let ready: Vec<_> = agent.logs().into_iter().filter(|v| v["message"] == "instance ready").collect();
    assert_eq!(ready.len(), 1, "one instance for the whole burst");
    assert!(ready[0]["start_ms"].as_u64().unwrap() >= 1500);
}

#[test]
fn readiness_uses_health_and_falls_back_to_list_workers() {
    let agent = Agent::builder("bk-health").args(["--max-builds", "2", "--start-timeout", "10s"]).start();
    let p = json(run(&agent, 0, &["ping"]));
    assert!(p.get("error").is_none(), "{p}");

    // A daemon without grpc.health.v1 (buildkit < 0.13) is ready once
    // ListWorkers answers; without the fallback it would time out.
    let agent = Agent::builder("bk-noh")
        .args(["--max-builds", "2", "--start-timeout", "60s"])
        .daemon_arg("--no-health")
        .start();
    let t0 = Instant::now();
    let h = json(run(&agent, 0, &["health"]));
    assert_eq!(h["error"]["code"], "Unimplemented", "the daemon really has no health service: {h}");
    let p = json(run(&agent, 0, &["ping"]));
    assert!(p.get("error").is_none(), "{p}");
    // Without the fallback the start would fail after the 60s start timeout.
    assert!(t0.elapsed() < Duration::from_secs(60), "readiness waited for the start timeout");
}

#[test]
fn two_instances_share_no_runtime_path() {
    let agent =
        Agent::builder("bk-paths").args(["--max-builds", "2", "--idle-timeout", "5s", "--socket-mode", "0666"]).start();
    let a = json(run(&agent, 5101, &["ping"]));
    let b = json(run(&agent, 5102, &["ping"]));
    assert_ne!(a["token"], b["token"]);
    let inst = agent.state_dir().join("instances");
    for (p, other) in [(&a, &b), (&b, &a)] {
        let root = p["root"].as_str().unwrap();
        let dir = std::path::Path::new(root).parent().unwrap();
        assert!(dir.starts_with(&inst), "{root}");
        assert_eq!(p["user"], "berth");
        for key in ["home", "xdg_runtime_dir"] {
            let v = p[key].as_str().unwrap();
            assert!(std::path::Path::new(v).starts_with(dir), "{key}={v} outside {}", dir.display());
            assert_ne!(p[key], other[key], "{key} shared");
        }
        let args: Vec<String> = serde_json::from_value(p["args"].clone()).unwrap();
        for flag in ["--config", "--otel-socket-path", "--root"] {
            let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} missing: {args:?}"));
            assert!(std::path::Path::new(&args[i + 1]).starts_with(dir), "{flag} {} outside the instance", args[i + 1]);
        }
        let cfg = std::fs::read_to_string(dir.join("buildkitd.toml")).unwrap();
        assert!(cfg.contains(&format!("unix://{}", dir.join("run/buildkitd.sock").display())), "{cfg}");
        assert!(!cfg.contains("tcp://"));
    }
}

#[test]
fn a_failing_daemon_is_not_restarted_for_every_retry() {
    let agent = Agent::builder("bk-backoff")
        .args(["--max-builds", "2", "--start-failure-backoff", "30s"])
        .daemon_arg("--fail-start=bk-backoff-broken-config")
        .start();
    for _ in 0..4 {
        let p = json(run(&agent, 0, &["info"]));
        assert_eq!(p["error"]["code"], "Unavailable", "{p}");
        assert!(p["error"]["message"].as_str().unwrap().contains("bk-backoff-broken-config"), "{p}");
    }
    // The end line is logged just after the refusal; give it a moment.
    let t0 = Instant::now();
    while agent.instance_ends().is_empty() && t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let ends = agent.instance_ends();
    assert_eq!(ends.len(), 1, "one start for four retries: {ends:?}");
    assert_eq!(ends[0]["reason"], "error");
    // With the backoff off, every retry is a new start.
    let other = Agent::builder("bk-backoff-off")
        .args(["--max-builds", "2", "--start-failure-backoff", "0s"])
        .daemon_arg("--fail-start=x")
        .start();
    for _ in 0..2 {
        assert_eq!(json(run(&other, 0, &["info"]))["error"]["code"], "Unavailable");
    }
    let t0 = Instant::now();
    while other.instance_ends().len() < 2 && t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(other.instance_ends().len(), 2, "with the backoff off, every retry starts anew");
}

#[test]
fn build_network_host_or_none() {
    let host_net = std::fs::read_link("/proc/self/ns/net").unwrap().to_string_lossy().into_owned();
    let shared = Agent::builder("bk-net-host").args(["--max-builds", "2", "--build-network", "host"]).start();
    let p = json(run(&shared, 0, &["ping"]));
    assert_eq!(p["ns"]["net"], host_net.as_str(), "host: builds use the node's network");
    drop(shared);
    let default = Agent::builder("bk-net-default").args(["--max-builds", "2"]).start();
    let p = json(run(&default, 0, &["ping"]));
    assert_ne!(p["ns"]["net"], host_net.as_str(), "default (isolated): a network namespace of its own");
    drop(default);
    let isolated = Agent::builder("bk-net-none").args(["--max-builds", "2", "--build-network", "none"]).start();
    let p = json(run(&isolated, 0, &["ping"]));
    assert!(p.get("error").is_none(), "{p}");
    assert_ne!(p["ns"]["net"], host_net.as_str(), "none: a network namespace of its own");
}
