//! Why a pod's instance ended stays visible where users look (issue 15):
//! the agent posts a Kubernetes Event on the pod, from the CSI volume
//! context, through the in-process API double (`berth_tests::apiserver`).
//! With the API down the agent keeps serving, and the log line says why.

use berth_agent::proto::csi_v1::node_client::NodeClient;
use berth_agent::proto::csi_v1::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest};
use berth_tests::apiserver::Double;
use berth_tests::harness::{is_instance_end, run_fakeclient, Agent, AgentBuilder};
use berth_tests::kubelet::{mount_cap, pod_ctx};
use berth_tests::proto::fake::PingRequest;
use berth_tests::{fake_client, try_channel};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// A CSI agent with a 64Mi build memory limit whose Kubernetes API is at
/// `kubeconfig`.
fn builder(name: &str, kubeconfig: &Path) -> AgentBuilder {
    Agent::builder(name)
        .args(["--max-builds", "2", "--idle-timeout", "30s", "--build-memory", "64Mi"])
        .args(["--node-name", "node-ev", "--publish-capacity=false"])
        .dir_arg("--csi-endpoint", "csi.sock")
        .dir_arg("--kubelet-dir", "kubelet")
        .dir_arg("--run-dir", "run")
        .env("KUBECONFIG", kubeconfig)
}

/// Publishes a volume for pod `ns/pod` with uid `uid`, as kubelet does;
/// returns the pod's socket.
async fn publish(agent: &Agent, vol: &str, ns: &str, pod: &str, uid: &str) -> PathBuf {
    let target = agent.dir().join(format!("kubelet/pods/{uid}/volumes/kubernetes.io~csi/{vol}/mount"));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let mut context = pod_ctx(pod, ns);
    context.insert("csi.storage.k8s.io/pod.uid".into(), uid.into());
    let req = NodePublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap()),
        volume_context: context,
        ..Default::default()
    };
    let csi = agent.dir().join("csi.sock");
    let deadline = std::time::Instant::now() + WAIT;
    let ch = loop {
        match try_channel(&csi).await {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() > deadline => panic!("connect {}: {e}", csi.display()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    NodeClient::new(ch).node_publish_volume(req).await.expect("publish");
    target.join("buildkitd.sock")
}

async fn unpublish(agent: &Agent, vol: &str, uid: &str) {
    let target = agent.dir().join(format!("kubelet/pods/{uid}/volumes/kubernetes.io~csi/{vol}/mount"));
    let ch = try_channel(&agent.dir().join("csi.sock")).await.unwrap();
    let req = NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: target.display().to_string() };
    NodeClient::new(ch).node_unpublish_volume(req).await.expect("unpublish");
}

/// A build on the pod's socket that allocates past the memory limit: the
/// OOM killer ends the daemon, hence the instance.
async fn oom_build(sock: &Path) {
    let sock = sock.to_path_buf();
    let run = tokio::task::spawn_blocking(move || run_fakeclient(&sock, &["--timeout", "30", "alloc", "256Mi"]))
        .await
        .unwrap();
    assert!(!run.ok(), "a 256Mi allocation under a 64Mi limit fails: {:?}", run.json);
}

/// `berth_events_total{result="<result>"}` from /metrics.
fn events_total(agent: &Agent, result: &str) -> f64 {
    let addr = agent.http_addr(WAIT).expect("http address");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let samples: HashMap<&str, f64> = raw
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(name, v)| v.parse().ok().map(|v| (name, v)))
        .collect();
    *samples
        .get(format!("berth_events_total{{result=\"{result}\"}}").as_str())
        .unwrap_or_else(|| panic!("no berth_events_total{{result={result:?}}} in /metrics:\n{raw}"))
}

/// How many Events the agent reported in its log (ends and limit hits).
fn reported(agent: &Agent) -> f64 {
    let kinds = ["pod's instance ended", "limit hit in a pod's instance"];
    agent.logs().iter().filter(|v| kinds.iter().any(|k| v["message"] == *k)).count() as f64
}

async fn wait_events_total(agent: &Agent, result: &str, want: f64) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let got = events_total(agent, result);
        if got == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "berth_events_total{{result={result:?}}} is {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_killed_pod_instance_posts_an_event_on_the_pod() {
    let api = Double::start(vec![]).await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = builder("events-oom", &api.kubeconfig(tmp.path())).start_async().await;
    let uid = format!("uid-oom-{}", std::process::id());
    let sock = publish(&agent, "ev-vol-oom", "ci", "runner-oom", &uid).await;
    oom_build(&sock).await;
    let end = agent
        .wait_log_async(0, is_instance_end, WAIT)
        .await
        .unwrap_or_else(|| panic!("instance end logged:\n{}", agent.log_tail(40)));
    assert_eq!(end["reason"], "oom");
    let id = end["instance"].as_str().unwrap().to_string();

    let deadline = std::time::Instant::now() + WAIT;
    while !api.events().iter().any(|e| e.reason.as_deref() == Some("BuildOOMKilled")) {
        assert!(std::time::Instant::now() < deadline, "no BuildOOMKilled Event: {:#?}", api.events());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = api.events();
    // The limit watcher may have seen the OOM kill a moment before the
    // daemon's end (BuildStepOOMKilled); the end itself is posted once.
    let (ends, others): (Vec<_>, Vec<_>) = events.iter().partition(|e| e.reason.as_deref() == Some("BuildOOMKilled"));
    assert_eq!(ends.len(), 1, "{events:#?}");
    assert!(others.iter().all(|e| e.reason.as_deref() == Some("BuildStepOOMKilled")), "{events:#?}");
    wait_events_total(&agent, "posted", events.len() as f64).await;
    let ev = ends[0];
    assert_eq!(ev.metadata.namespace.as_deref(), Some("ci"));
    assert!(ev.metadata.name.as_deref().unwrap().starts_with("runner-oom."), "{:?}", ev.metadata.name);
    let on = ev.regarding.as_ref().expect("regarding");
    assert_eq!(
        (on.api_version.as_deref(), on.kind.as_deref(), on.namespace.as_deref(), on.name.as_deref()),
        (Some("v1"), Some("Pod"), Some("ci"), Some("runner-oom"))
    );
    assert_eq!(on.uid.as_deref(), Some(uid.as_str()), "the Event is on this pod, not a namesake");
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.reason.as_deref(), Some("BuildOOMKilled"));
    assert_eq!(ev.action.as_deref(), Some("Reap"));
    assert_eq!(ev.reporting_controller.as_deref(), Some("berth.dev/agent"));
    assert_eq!(ev.reporting_instance.as_deref(), Some("node-ev"));
    let note = ev.note.as_deref().unwrap();
    assert!(
        note.starts_with(&format!("berth instance {id} ended: ")) && note.contains("memory limit of 64Mi"),
        "{note}"
    );
    assert!(ev.event_time.is_some());
    // The log line carries the same message, whatever the API did.
    let line = agent
        .wait_log_async(0, |v| v["message"] == "pod's instance ended" && v["reason"] == "BuildOOMKilled", WAIT)
        .await
        .expect("the end's log line");
    assert_eq!(line["pod"], "ci/runner-oom");
    assert_eq!(line["note"].as_str(), Some(note));
    assert_eq!(line["instance"], id.as_str());
    assert_eq!(events_total(&agent, "failed"), 0.0);
    assert_eq!(events_total(&agent, "dropped"), 0.0);
    // Unpublish (the pod is being deleted) posts nothing more.
    unpublish(&agent, "ev-vol-oom", &uid).await;
    agent.wait_log_async(0, |v| v["message"] == "volume unpublished", WAIT).await.expect("unpublished");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.events().len(), events.len(), "{:#?}", api.events());
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_down_the_agent_keeps_serving_and_logs_why() {
    // An address that refuses connections: bound, then closed.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: down\n  cluster:\n    server: http://{down}\ncontexts:\n- name: down\n  context:\n    cluster: down\n    user: nobody\ncurrent-context: down\nusers:\n- name: nobody\n  user: {{}}\n"),
    )
    .unwrap();
    let agent = builder("events-down", &kubeconfig).start_async().await;
    let uid = format!("uid-down-{}", std::process::id());
    let sock = publish(&agent, "ev-vol-down", "ci", "runner-down", &uid).await;
    oom_build(&sock).await;
    let line = agent
        .wait_log_async(0, |v| v["message"] == "pod's instance ended", WAIT)
        .await
        .unwrap_or_else(|| panic!("the end's log line:\n{}", agent.log_tail(40)));
    assert_eq!(line["reason"], "BuildOOMKilled");
    assert_eq!(line["pod"], "ci/runner-down");
    assert!(line["note"].as_str().unwrap().contains("memory limit of 64Mi"), "{line}");
    // Retried with backoff, then given up and counted.
    agent
        .wait_log_async(0, |v| v.to_string().contains("retrying") && v["reason"] == "BuildOOMKilled", WAIT)
        .await
        .expect("a retry is logged");
    // Every one reported (the end, and maybe the OOM kill seen a moment before it) failed.
    wait_events_total(&agent, "failed", reported(&agent)).await;
    assert_eq!(events_total(&agent, "posted"), 0.0);
    // Still serving: the pod's next build gets a fresh instance.
    let sock2 = sock.clone();
    let reply = fake_client(&sock2).await.ping(PingRequest {}).await.expect("the agent keeps serving");
    assert!(!reply.into_inner().token.is_empty());
    assert_eq!(agent.instance_ends().len(), 1, "one instance ended, the new one serves");
    unpublish(&agent, "ev-vol-down", &uid).await;
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_api_access_it_is_said_once_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = builder("events-noapi", &tmp.path().join("no-such-kubeconfig")).start_async().await;
    let said = agent
        .wait_log_async(0, |v| v["message"].as_str().is_some_and(|m| m.starts_with("no Kubernetes API access")), WAIT)
        .await
        .unwrap_or_else(|| panic!("said at start:\n{}", agent.log_tail(40)));
    assert!(said["message"].as_str().unwrap().contains("not posted as an Event"), "{said}");
    let uid = format!("uid-noapi-{}", std::process::id());
    let sock = publish(&agent, "ev-vol-noapi", "ci", "runner-noapi", &uid).await;
    oom_build(&sock).await;
    agent.wait_log_async(0, |v| v["message"] == "pod's instance ended", WAIT).await.expect("the end's log line");
    wait_events_total(&agent, "dropped", reported(&agent)).await;
    unpublish(&agent, "ev-vol-noapi", &uid).await;
    let count = agent
        .logs()
        .iter()
        .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with("no Kubernetes API access")))
        .count();
    assert_eq!(count, 1, "said once, not per Event");
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_hit_in_a_running_pod_instance_posts_an_event() {
    let api = Double::start(vec![]).await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = builder("events-pids", &api.kubeconfig(tmp.path())).args(["--build-pids", "32"]).start_async().await;
    let uid = format!("uid-pids-{}", std::process::id());
    let sock = publish(&agent, "ev-vol-pids", "ci", "runner-pids", &uid).await;
    let s = sock.clone();
    let fork =
        tokio::task::spawn_blocking(move || run_fakeclient(&s, &["--timeout", "20", "fork", "64"])).await.unwrap();
    assert!(fork.json["started"].as_u64().unwrap() < 64, "{:?}", fork.json);
    // While the instance still runs (idle timeout 30 s), not at its end.
    wait_events_total(&agent, "posted", 1.0).await;
    assert!(agent.instance_ends().is_empty(), "the instance is still running");
    let events = api.events();
    let ev = &events[0];
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.reason.as_deref(), Some("BuildPidsLimitHit"));
    assert_eq!(ev.action.as_deref(), Some("Limit"));
    assert_eq!(ev.regarding.as_ref().unwrap().uid.as_deref(), Some(uid.as_str()));
    assert!(ev.note.as_deref().unwrap().contains("limit of 32 processes"), "{:?}", ev.note);
    unpublish(&agent, "ev-vol-pids", &uid).await;
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}
