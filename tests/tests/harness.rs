//! Self-test of the `Agent` harness against a stand-in agent: a shell script
//! named `berth-agent` that logs one JSON line and execs fakekitd on the
//! `--listen` socket. One test only in this file: it sets `BERTH_BIN_DIR`,
//! which is process-wide.

use berth_tests::harness::{bin_dir, Agent};
use berth_tests::proto::fake::PingRequest;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const STAND_IN: &str = r#"#!/bin/sh
# Stand-in for berth-agent: `run --listen unix://P --state-dir S ...`
set -e
while [ $# -gt 0 ]; do
  case "$1" in
    --listen) L="${2#unix://}"; shift ;;
    --state-dir) S="$2"; shift ;;
    --cgroup-parent) C="$2"; shift ;;
  esac
  shift
done
mkdir -p "$S"
echo "{\"timestamp\":\"now\",\"level\":\"INFO\",\"fields\":{\"message\":\"listening\",\"addr\":\"$L\",\"cgroup_parent\":\"$C\"}}" >&2
echo "{\"level\":\"INFO\",\"message\":\"serving /healthz\",\"http_addr\":\"$BERTH_HTTP_ADDR\",\"leaked\":\"${BERTH_CONFIG:-}\"}" >&2
echo "not json on stdout"
exec "$(dirname "$0")/fakekitd" --addr "unix://$L" --root "$S/root"
"#;

#[tokio::test]
async fn agent_harness_starts_logs_signals_restarts_and_scans() {
    let real = bin_dir();
    let fake_bins = tempfile::tempdir().unwrap();
    for b in ["fakekitd", "fakeclient", "berth-shim"] {
        // berth-shim is not run by the stand-in; any file will do.
        let src = if b == "berth-shim" { real.join("fakekitd") } else { real.join(b) };
        std::os::unix::fs::symlink(src, fake_bins.path().join(b)).unwrap();
    }
    let agent_path = fake_bins.path().join("berth-agent");
    std::fs::write(&agent_path, STAND_IN).unwrap();
    std::fs::set_permissions(&agent_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::env::set_var("BERTH_BIN_DIR", fake_bins.path());
    std::env::set_var("BERTH_CONFIG", "/must/not/reach/the/agent.toml");

    let agent = Agent::builder("harness self-test").arg("--idle-timeout").arg("5s").start_async().await;
    let mode = std::fs::metadata(agent.dir()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755);
    assert!(agent.cgroup_parent().starts_with("berth-test/harness_self-test-"), "{}", agent.cgroup_parent());
    let (base, count) = agent.idmap();
    assert_eq!((base % 65536, count), (0, 8 * 65536));
    let cl = agent.command_line();
    assert!(cl.iter().any(|a| a == "--idle-timeout"), "{cl:?}");

    let listening =
        agent.wait_log_async(0, |v| v["message"] == "listening", Duration::from_secs(5)).await.expect("listening line");
    assert_eq!(listening["addr"], agent.socket().to_string_lossy().as_ref());
    assert_eq!(listening["cgroup_parent"], agent.cgroup_parent());
    assert!(agent
        .wait_log(|v| v["raw"] == true && v["message"] == "not json on stdout", Duration::from_secs(5))
        .is_some());
    assert!(agent.wait_log(|v| v["message"] == "never logged", Duration::from_millis(100)).is_none());

    // BERTH_* from the test's environment do not reach the agent; the HTTP
    // endpoint gets an ephemeral loopback port.
    let http = agent.http_addr(Duration::from_secs(5)).expect("http_addr logged");
    assert_eq!(http.to_string(), "127.0.0.1:0");
    assert!(agent.wait_log(|v| v["leaked"] == "", Duration::from_secs(1)).is_some());

    let first = berth_tests::fake_client(agent.socket()).await.ping(PingRequest {}).await.unwrap().into_inner();
    assert_eq!(Some(first.pid), agent.pid());
    assert!(agent.leak_scan().is_empty(), "the agent itself is not a leak: {:?}", agent.leak_scan());

    // A process naming the dir is a leak; once it is gone the scan is clean.
    let mut stray = std::process::Command::new("sh")
        .arg("-c")
        .arg("while :; do sleep 0.1; done")
        .arg(agent.state_dir())
        .spawn()
        .unwrap();
    // (Right after spawn() the new argv may not be visible yet.)
    let needle = format!("process {}", stray.id());
    let mut leaks = Vec::new();
    for _ in 0..100 {
        leaks = agent.leak_scan();
        if leaks.iter().any(|l| l.contains(&needle)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(leaks.iter().any(|l| l.contains(&needle)), "{leaks:?}");
    stray.kill().unwrap();
    stray.wait().unwrap();
    assert!(agent.wait_clean_async(Duration::from_secs(5)).await.is_empty());

    // Leftovers in the state dir are reported.
    std::fs::create_dir_all(agent.state_dir().join("instances/i1")).unwrap();
    std::fs::create_dir_all(agent.state_dir().join("leases")).unwrap();
    std::fs::write(agent.state_dir().join("leases/x"), "").unwrap();
    let leaks = agent.leak_scan();
    assert_eq!(leaks.len(), 2, "{leaks:?}");
    std::fs::remove_dir(agent.state_dir().join("instances/i1")).unwrap();
    std::fs::remove_file(agent.state_dir().join("leases/x")).unwrap();

    agent.sigterm();
    let st = agent.wait_exit_async(Duration::from_secs(10)).await.expect("exited");
    assert_eq!(st.code(), Some(1));
    assert_eq!(agent.pid(), None);

    let mark = agent.log_mark();
    agent.restart_async().await;
    assert!(agent.wait_log_since(mark, |v| v["message"] == "listening", Duration::from_secs(5)).is_some());
    let second = berth_tests::fake_client(agent.socket()).await.ping(PingRequest {}).await.unwrap().into_inner();
    assert_ne!(second.token, first.token);
    assert_eq!(Some(second.pid), agent.pid());

    let pid = second.pid;
    let dir = agent.dir().to_path_buf();
    drop(agent);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "agent killed and reaped on drop");
    assert!(!dir.exists(), "temp dir removed on drop");
}
