//! A build hitting a limit kills only that build, and the client is told
//! why: when an instance dies under a connected client, berth ends the
//! client's HTTP/2 connection with a GOAWAY whose debug data names the
//! limit. grpc-go clients (buildx, buildctl) print that debug data; this
//! test reads it the same way, with a raw h2 client.
//!
//! Runs on this machine's cgroup v1 and in the cgroup v2 VM lane; every
//! fixed wait and idle timeout goes through the time scale (`scaled`).

use berth_tests::grpc::{raw_fake_call, RawCall};
use berth_tests::harness::{scaled, scaled_flag, scaled_secs, Agent};
use berth_tests::proto::fake::AllocRequest;
use prost::Message;
use std::time::Duration;

/// Fake.Alloc as a gRPC call on a raw h2 connection: what a grpc-go client
/// sees of the connection, GOAWAY included.
async fn alloc_call(socket: &std::path::Path, bytes: u64) -> RawCall {
    raw_fake_call(socket, "Alloc", &AllocRequest { bytes }.encode_to_vec()).await
}

async fn alloc_on_raw_h2(socket: &std::path::Path, bytes: u64) -> String {
    let (resp, _send, _client, conn) = alloc_call(socket, bytes).await;
    let call = tokio::time::timeout(scaled(Duration::from_secs(30)), resp).await.expect("call hangs");
    drop((_send, _client));
    let conn_end =
        tokio::time::timeout(scaled(Duration::from_secs(30)), conn).await.expect("connection hangs").unwrap();
    format!("call: {call:?}; connection: {conn_end:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_killed_build_tells_its_client_why() {
    let agent = Agent::builder("limits-oom")
        .args(["--build-memory", "64Mi", "--max-builds", "2", "--idle-timeout", &scaled_flag("2s")])
        .start_async()
        .await;
    let seen = alloc_on_raw_h2(agent.socket(), 256 << 20).await;
    assert!(seen.contains("memory limit of 64Mi") && seen.contains("OOM"), "{seen}");
    let end = agent
        .wait_log_async(0, berth_tests::harness::is_instance_end, Duration::from_secs(20))
        .await
        .expect("instance end logged");
    assert_eq!(end["reason"], "oom");
    let leaks = agent.wait_clean_async(Duration::from_secs(20)).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_within_its_limits_gets_no_goaway() {
    let agent = Agent::builder("limits-ok")
        .args(["--build-memory", "256Mi", "--max-builds", "2", "--idle-timeout", &scaled_flag("2s")])
        .start_async()
        .await;
    let (resp, send, client, conn) = alloc_call(agent.socket(), 8 << 20).await;
    let resp = resp.await.expect("call succeeds");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("grpc trailers");
    assert_eq!(trailers.get("grpc-status").map(|v| v.to_str().unwrap()), Some("0"));
    drop((client, send, body));
    let end = tokio::time::timeout(scaled(Duration::from_secs(10)), conn).await.expect("closes").unwrap();
    assert!(end.is_ok(), "a healthy connection ends cleanly: {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_fork_in_a_running_build_is_logged_as_it_happens() {
    let agent = Agent::builder("limits-pids-live")
        .args(["--build-pids", "32", "--max-builds", "2", "--idle-timeout", &scaled_flag("30s")])
        .start_async()
        .await;
    let fork = berth_tests::harness::run_fakeclient(agent.socket(), &["--timeout", &scaled_secs(20), "fork", "64"]);
    assert!(fork.json["started"].as_u64().unwrap() < 64, "{:?}", fork.json);
    // While the instance still runs (idle timeout 30 s), not only at its end.
    let hit = agent
        .wait_log_async(
            0,
            |v| v["message"].as_str().is_some_and(|m| m.contains("refused at the pids limit")),
            Duration::from_secs(10),
        )
        .await
        .expect("the pids limit hit is logged while the build runs");
    assert_eq!(hit["limit"], 32);
    assert!(agent.instance_ends().is_empty(), "the instance is still running");
}
