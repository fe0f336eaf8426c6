//! The agent registers its CSI driver with kubelet itself, surge-safe. The
//! suite plays kubelet's plugin watcher (`berth_tests::kubelet`) on a
//! plugins_registry dir in the agent's temp dir, then calls the CSI endpoint
//! GetInfo named, as kubelet does.

use berth_agent::proto::csi_v1::node_client::NodeClient;
use berth_agent::proto::csi_v1::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest};
use berth_tests::harness::{fakeclient, run_fakeclient, Agent, AgentBuilder};
use berth_tests::kubelet::{mount_cap, pod_ctx, PluginWatcher, Seen};
use berth_tests::try_channel;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
const DRIVER: &str = "berth.dev";

/// An agent serving CSI, registering in `<temp>/kubelet/plugins_registry`.
fn builder(name: &str) -> AgentBuilder {
    Agent::builder(name)
        .args(["--max-builds", "4", "--idle-timeout", "500ms", "--socket-mode", "0666"])
        .args(["--http-addr", "127.0.0.1:0"])
        .dir_arg("--csi-endpoint", "csi.sock")
        .dir_arg("--kubelet-dir", "kubelet")
        .dir_arg("--run-dir", "run")
        .dir_arg("--registration-dir", "kubelet/plugins_registry")
}

fn registry_dir(agent: &Agent) -> PathBuf {
    agent.dir().join("kubelet/plugins_registry")
}

fn reg_socket(agent: &Agent) -> PathBuf {
    registry_dir(agent).join(format!("{DRIVER}-reg.sock"))
}

fn http_get(agent: &Agent, path: &str) -> (u16, String) {
    let addr = agent.http_addr(WAIT).expect("http address logged");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out.split_whitespace().nth(1).unwrap().parse().unwrap(), out)
}

/// Polls /readyz until `want` (200 or 503); returns the last body.
fn wait_readyz(agent: &Agent, want: u16) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = http_get(agent, "/readyz");
        if code == want || Instant::now() > deadline {
            assert_eq!(code, want, "readyz: {body}");
            return body;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(agent: &Agent, name: &str) -> Option<f64> {
    let (_, body) = http_get(agent, "/metrics");
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

fn registered(s: &Seen) -> Option<(u64, String, bool)> {
    match s {
        Seen::Registered { ino, info, accepted, .. } => Some((*ino, info.endpoint.clone(), *accepted)),
        _ => None,
    }
}

/// A ~3 s fakekitd stream as a separate client process: the build in flight.
fn start_stream(socket: &Path, uid: u32) -> Child {
    let mut cmd = fakeclient(socket);
    cmd.args(["--timeout", "60", "stream", "4Mi", "64Ki", "45"]).uid(uid).gid(uid);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

fn finish(mut child: Child) -> Value {
    let status = child.wait().unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success() || !out.is_empty(), "client failed: {status:?}");
    out.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_registers_the_driver_and_reaches_csi_at_the_endpoint_it_names() {
    let agent = builder("reg-one").start();
    std::fs::create_dir_all(registry_dir(&agent)).unwrap();
    // No kubelet yet: the socket is offered, readiness waits for kubelet's yes.
    let sock = reg_socket(&agent);
    berth_tests::harness::poll(WAIT, Duration::from_millis(20), || sock.exists().then_some(()))
        .unwrap_or_else(|| panic!("no registration socket:\n{}", agent.log_tail(30)));
    let body = wait_readyz(&agent, 503);
    assert!(body.contains("kubelet has not registered"), "{body}");
    assert_eq!(metric(&agent, "berth_kubelet_registered"), Some(0.0));

    let watcher = PluginWatcher::start(&registry_dir(&agent), DRIVER);
    let seen = watcher.wait_registration(1, WAIT).unwrap_or_else(|| panic!("not registered: {:?}", watcher.seen()));
    let (_, endpoint, accepted) = registered(&seen).unwrap();
    assert!(accepted);
    assert_eq!(Path::new(&endpoint), agent.dir().join("csi.sock"), "GetInfo names the CSI endpoint");
    agent
        .wait_log(|v| v["message"] == "kubelet registered the CSI driver", WAIT)
        .unwrap_or_else(|| panic!("no log of the registration:\n{}", agent.log_tail(30)));
    wait_readyz(&agent, 200);
    assert_eq!(metric(&agent, "berth_kubelet_registered"), Some(1.0));

    // kubelet calls the endpoint it was given: a pod's volume is published.
    let mut node = NodeClient::new(try_channel(Path::new(&endpoint)).await.unwrap());
    let target = agent.dir().join("kubelet/pods/pod-a/volumes/kubernetes.io~csi/vol-a/mount");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let req = NodePublishVolumeRequest {
        volume_id: "vol-a".into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap()),
        volume_context: pod_ctx("pod-a", "ci"),
        ..Default::default()
    };
    node.node_publish_volume(req).await.expect("publish through the registered endpoint");
    let ping = run_fakeclient(&target.join("buildkitd.sock"), &["ping"]);
    assert!(ping.ok(), "pod socket does not serve: {ping:?}");
    let un = NodeUnpublishVolumeRequest { volume_id: "vol-a".into(), target_path: target.display().to_string() };
    node.node_unpublish_volume(un).await.expect("unpublish");

    // A plain exit (no newer agent) removes the socket: kubelet deregisters.
    agent.sigterm();
    assert!(agent.wait_exit(WAIT).expect("agent exits").success());
    assert!(!sock.exists(), "the exiting agent left its own registration socket");
    watcher
        .wait(WAIT, |s| s.iter().any(|e| matches!(e, Seen::Deregistered { .. })).then_some(()))
        .unwrap_or_else(|| panic!("kubelet never saw the socket go: {:?}", watcher.seen()));
    let leaks = agent.wait_clean(WAIT);
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[test]
fn surge_rollout_never_deregisters_and_leaves_the_new_agents_socket() {
    let first = builder("reg-surge").start();
    std::fs::create_dir_all(registry_dir(&first)).unwrap();
    let watcher = PluginWatcher::start(&registry_dir(&first), DRIVER);
    let one = watcher.wait_registration(1, WAIT).unwrap_or_else(|| panic!("first: {:?}", watcher.seen()));
    let (first_ino, _, _) = registered(&one).unwrap();
    let mark = watcher.seen().len();
    let stream = start_stream(first.socket(), 2601);
    first.wait_log(|v| v["message"] == "instance ready", WAIT).expect("the build runs");

    // maxSurge: the new pod starts beside the old one and registers.
    let second = first.spawn_sibling();
    second
        .wait_log(|v| v["message"] == "kubelet registered the CSI driver", WAIT)
        .unwrap_or_else(|| panic!("second agent not registered: {:?}", watcher.seen()));
    let two = watcher.wait_registration(2, WAIT).unwrap();
    let (second_ino, _, _) = registered(&two).unwrap();
    assert_ne!(first_ino, second_ino, "the second agent offered its own socket");

    // The old pod gets SIGTERM: its build completes, it exits.
    first.sigterm();
    let done = finish(stream);
    assert_eq!(done["ok"], true, "the build in flight was broken: {done}");
    assert!(first.wait_exit(WAIT).expect("old agent exits").success());

    // kubelet never saw the socket go (neither when the new agent replaced
    // it nor when the old one exited), and the socket on disk is the new one's.
    std::thread::sleep(Duration::from_millis(300));
    let after: Vec<Seen> = watcher.seen().split_off(mark);
    assert!(
        !after.iter().any(|e| matches!(e, Seen::Deregistered { .. })),
        "kubelet saw the driver deregistered during the surge: {after:?}"
    );
    let on_disk = std::fs::symlink_metadata(reg_socket(&first)).expect("registration socket still there").ino();
    assert_eq!(on_disk, second_ino, "the socket on disk is not the new agent's");
    // And the new agent still answers kubelet there.
    let fresh = PluginWatcher::start(&registry_dir(&first), DRIVER);
    assert!(fresh.wait_registration(1, WAIT).is_some(), "the new agent's socket does not answer: {:?}", fresh.seen());
    second.sigterm();
    assert!(second.wait_exit(WAIT).expect("second agent exits").success());
}

#[test]
fn max_unavailable_rollout_deregisters_then_registers_again() {
    let first = builder("reg-unavail").start();
    std::fs::create_dir_all(registry_dir(&first)).unwrap();
    let watcher = PluginWatcher::start(&registry_dir(&first), DRIVER);
    watcher.wait_registration(1, WAIT).unwrap_or_else(|| panic!("{:?}", watcher.seen()));
    first.sigterm();
    assert!(first.wait_exit(WAIT).expect("old agent exits").success());
    watcher
        .wait(WAIT, |s| matches!(s.last(), Some(Seen::Deregistered { .. })).then_some(()))
        .unwrap_or_else(|| panic!("not deregistered: {:?}", watcher.seen()));
    // The new pod starts only now, on the same paths.
    first.restart();
    let again = watcher.wait_registration(2, WAIT).unwrap_or_else(|| panic!("{:?}", watcher.seen()));
    assert!(registered(&again).unwrap().2);
    wait_readyz(&first, 200);
}

#[test]
fn a_refused_registration_is_logged_retried_and_keeps_readyz_unready() {
    let agent = builder("reg-refused").start();
    std::fs::create_dir_all(registry_dir(&agent)).unwrap();
    let watcher = PluginWatcher::start(&registry_dir(&agent), DRIVER);
    watcher.set_accept(false);
    let refused = agent
        .wait_log(|v| v["message"] == "kubelet refused the CSI driver registration", WAIT)
        .unwrap_or_else(|| panic!("refusal not logged:\n{}", agent.log_tail(30)));
    assert!(refused["kubelet_error"].as_str().unwrap().contains("refused on purpose"), "{refused}");
    let body = wait_readyz(&agent, 503);
    assert!(body.contains("refused") && body.contains("refused on purpose"), "{body}");
    assert_eq!(metric(&agent, "berth_kubelet_registered"), Some(0.0));
    // Retried: the socket is offered again, and kubelet asked again.
    watcher.wait_registration(2, WAIT).unwrap_or_else(|| panic!("no retry: {:?}", watcher.seen()));
    // kubelet accepts at a later try: ready.
    watcher.set_accept(true);
    watcher
        .wait(WAIT, |s| s.iter().filter_map(registered).find(|r| r.2).map(|_| ()))
        .unwrap_or_else(|| panic!("never accepted: {:?}", watcher.seen()));
    wait_readyz(&agent, 200);
    assert_eq!(metric(&agent, "berth_kubelet_registered"), Some(1.0));
}

#[test]
fn without_kubelets_registry_dir_the_node_socket_still_serves() {
    let agent = builder("reg-nodir").start();
    let line = agent
        .wait_log(|v| v["message"].as_str().is_some_and(|m| m.contains("plugin registration dir does not exist")), WAIT)
        .unwrap_or_else(|| panic!("absent dir not explained:\n{}", agent.log_tail(30)));
    assert!(line["message"].as_str().unwrap().contains("node socket are served"), "{line}");
    let ping = run_fakeclient(agent.socket(), &["ping"]);
    assert!(ping.ok(), "node socket refused: {ping:?}");
    assert!(wait_readyz(&agent, 503).contains("does not exist"));
    // kubelet's dir appears (kubelet started late): the agent registers.
    std::fs::create_dir_all(registry_dir(&agent)).unwrap();
    let watcher = PluginWatcher::start(&registry_dir(&agent), DRIVER);
    watcher.wait_registration(1, WAIT).unwrap_or_else(|| panic!("{:?}", watcher.seen()));
    wait_readyz(&agent, 200);
}

#[test]
fn registration_dir_without_a_csi_endpoint_is_refused_at_start() {
    let out = std::process::Command::new(berth_tests::harness::bin_path("berth-agent"))
        .args(["run", "--registration-dir", "/tmp/nowhere", "--daemon", "/bin/true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--registration-dir") && err.contains("--csi-endpoint"), "{err}");
}
