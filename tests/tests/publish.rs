//! Capacity publishing and `capacity --cluster` against an in-process
//! Kubernetes API double (see `berth_tests::apiserver`).

use berth_agent::config::OutputFormat;
use berth_agent::publish::{cluster, Progress, Publisher, Settings};
use berth_tests::apiserver::{node, Double};
use hyper::Method;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::instrument::WithSubscriber;

const STATUS: &str = "/api/v1/nodes/node-a/status";
const META: &str = "/api/v1/nodes/node-a";
const RESOURCE: &str = "berth.dev/build";

/// Short intervals so retries take milliseconds.
fn fast(node: &str) -> Settings {
    let mut s = Settings::new(node, RESOURCE);
    s.backoff_min = Duration::from_millis(10);
    s.backoff_max = Duration::from_millis(80);
    s.refresh = Duration::from_millis(20);
    s.resync = Duration::from_secs(3600);
    s.request_timeout = Duration::from_secs(5);
    s
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Running {
    progress: watch::Receiver<Progress>,
    slots: watch::Sender<u64>,
    in_use: Arc<AtomicU64>,
    logs: Logs,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

fn start(client: kube::Client, settings: Settings, slots: u64) -> Running {
    let (slots_tx, slots_rx) = watch::channel(slots);
    let in_use = Arc::new(AtomicU64::new(0));
    let reader = in_use.clone();
    let publisher = Publisher::new(client, settings, slots_rx, move || reader.load(Ordering::SeqCst));
    let progress = publisher.progress();
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(
        publisher
            .run(async move {
                let _ = stopped.await;
            })
            .with_subscriber(subscriber),
    );
    Running { progress, slots: slots_tx, in_use, logs, stop: Some(stop), task }
}

impl Running {
    /// Waits (at most 10 s) until the progress satisfies `pred`.
    async fn until(&mut self, what: &str, pred: impl FnMut(&Progress) -> bool) -> Progress {
        let got = tokio::time::timeout(Duration::from_secs(10), self.progress.wait_for(pred))
            .await
            .map(|r| r.map(|p| p.clone()));
        match got {
            Ok(Ok(p)) => p,
            _ => panic!(
                "timed out waiting for {what}; progress {:?}\nlogs:\n{}",
                *self.progress.borrow(),
                self.logs.text()
            ),
        }
    }

    /// Stops the publisher and checks that it ends promptly.
    async fn stop(mut self) -> Progress {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("the publisher stops when asked")
            .expect("the publisher does not panic");
        let p = self.progress.borrow().clone();
        p
    }
}

#[tokio::test]
async fn status_patch_is_a_json_patch_of_capacity_and_allocatable() {
    let api = Double::start(vec![node("node-a", "amd64", None, None), node("node-b", "amd64", None, None)]).await;
    let mut p = start(api.client(), fast("node-a"), 4);
    p.until("slots published", |p| p.slots == Some(4) && p.metadata_patches >= 1).await;
    p.stop().await;

    let patches = api.seen_at("PATCH", STATUS);
    assert_eq!(patches.len(), 1, "one status patch: {:#?}", api.seen());
    let s = &patches[0];
    assert_eq!(s.content_type.as_deref(), Some("application/json-patch+json"));
    assert_eq!(
        s.json(),
        json!([
            {"op": "add", "path": "/status/capacity/berth.dev~1build", "value": "4"},
            {"op": "add", "path": "/status/allocatable/berth.dev~1build", "value": "4"},
        ])
    );
    assert!(s.query.contains("fieldManager=berth-agent"), "{}", s.query);
    assert_eq!(s.answered, 200);
    // The double applied it: the resource is there, the kubelet's are untouched.
    let status = api.node("node-a").status.unwrap();
    let (cap, alloc) = (status.capacity.unwrap(), status.allocatable.unwrap());
    assert_eq!(cap[RESOURCE].0, "4");
    assert_eq!(alloc[RESOURCE].0, "4");
    assert_eq!(cap["cpu"].0, "8");
    // Nothing touched another node, nothing but node-a's object and status subresource.
    assert!(!api.node("node-b").status.unwrap().capacity.unwrap().contains_key(RESOURCE));
    for s in api.seen() {
        assert!(s.path == STATUS || s.path == META, "unexpected call {} {}", s.method, s.path);
    }
}

#[tokio::test]
async fn metadata_patch_carries_version_arch_and_slots() {
    let api = Double::start(vec![node("node-a", "amd64", None, None)]).await;
    let mut p = start(api.client(), fast("node-a"), 6);
    p.until("metadata published", |p| p.metadata_patches >= 1).await;
    p.stop().await;

    let patches = api.seen_at("PATCH", META);
    assert_eq!(patches.len(), 1, "{:#?}", api.seen());
    let s = &patches[0];
    assert_eq!(s.content_type.as_deref(), Some("application/merge-patch+json"));
    let body = s.json();
    assert_eq!(
        body,
        json!({"metadata": {
            "labels": {"berth.dev/agent-version": env!("CARGO_PKG_VERSION"), "berth.dev/arch": berth_shim::host::this_arch()},
            "annotations": {"berth.dev/slots": "6", "berth.dev/builds-in-use": "0"},
        }})
    );
    let meta = api.node("node-a").metadata;
    let labels = meta.labels.unwrap();
    assert_eq!(labels["berth.dev/agent-version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(labels["berth.dev/arch"], berth_shim::host::this_arch());
    assert_eq!(labels["kubernetes.io/arch"], "amd64", "a merge patch keeps the other labels");
    assert_eq!(meta.annotations.unwrap()["berth.dev/slots"], "6");
}

#[tokio::test]
async fn slot_and_in_use_changes_are_published_only_when_changed() {
    let api = Double::start(vec![node("node-a", "arm64", None, None)]).await;
    let mut p = start(api.client(), fast("node-a"), 4);
    p.until("first publish", |p| p.slots == Some(4) && p.in_use == Some(0)).await;
    // Several refresh intervals with nothing changed: no new calls.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(api.seen().len(), 2, "unchanged state is not re-sent: {:#?}", api.seen());

    p.in_use.store(3, Ordering::SeqCst);
    p.until("in-use refresh", |p| p.in_use == Some(3)).await;
    assert_eq!(api.seen_at("PATCH", STATUS).len(), 1, "builds in use only touch the metadata");
    let meta = api.seen_at("PATCH", META);
    assert_eq!(meta.len(), 2);
    assert_eq!(meta[1].json()["metadata"]["annotations"]["berth.dev/builds-in-use"], "3");

    p.slots.send_replace(6);
    p.until("new slot count", |p| p.slots == Some(6) && p.metadata_patches >= 3).await;
    let status = api.seen_at("PATCH", STATUS);
    assert_eq!(status.len(), 2);
    assert_eq!(status[1].json()[0]["value"], "6");
    assert_eq!(status[1].json()[1]["value"], "6");
    assert_eq!(api.node("node-a").status.unwrap().allocatable.unwrap()[RESOURCE].0, "6");
    assert_eq!(api.node("node-a").metadata.annotations.unwrap()["berth.dev/slots"], "6");
    let end = p.stop().await;
    assert_eq!(end.failures, 0);
}

#[tokio::test]
async fn unavailable_api_is_retried_with_backoff_until_it_succeeds() {
    let api = Double::start(vec![node("node-a", "amd64", None, None)]).await;
    api.fail(Method::PATCH, STATUS, 503, 2);
    api.fail(Method::PATCH, META, 429, 1);
    let started = std::time::Instant::now();
    let mut p = start(api.client(), fast("node-a"), 4);
    p.until("published after the faults", |p| p.slots == Some(4) && p.metadata_patches == 1).await;
    let logs = p.logs.text();
    let end = p.stop().await;

    let status: Vec<u16> = api.seen_at("PATCH", STATUS).iter().map(|s| s.answered).collect();
    assert_eq!(status, [503, 503, 200]);
    let meta: Vec<u16> = api.seen_at("PATCH", META).iter().map(|s| s.answered).collect();
    assert_eq!(meta, [429, 200]);
    assert_eq!((end.failures, end.status_patches, end.metadata_patches), (3, 1, 1));
    // Backoff 10 ms, then 20 ms (jittered to at least half): the retries waited.
    assert!(started.elapsed() >= Duration::from_millis(15), "{:?}", started.elapsed());
    // One WARN line per transient failure, saying it is retried and when.
    let lines = |code: &str| logs.lines().filter(|l| l.contains(code)).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(lines("code=503").len(), 2, "{logs}");
    assert_eq!(lines("code=429").len(), 1, "{logs}");
    for l in lines("code=503").iter().chain(&lines("code=429")) {
        assert!(
            l.contains("WARN") && l.contains("Kubernetes API unavailable; retrying") && l.contains("retry_in="),
            "{l}"
        );
    }
    assert!(logs.contains("Kubernetes API reachable again"), "{logs}");
}

#[tokio::test]
async fn forbidden_is_logged_with_the_rbac_fix_and_retried() {
    let api = Double::start(vec![node("node-a", "amd64", None, None)]).await;
    api.fail(Method::PATCH, STATUS, 403, 2);
    let mut p = start(api.client(), fast("node-a"), 2);
    p.until("published after the refusals", |p| p.slots == Some(2)).await;
    let logs = p.logs.text();
    let end = p.stop().await;

    assert_eq!(api.seen_at("PATCH", STATUS).len(), 3);
    assert_eq!(end.failures, 2);
    let refusals: Vec<&str> = logs.lines().filter(|l| l.contains("refused the node update")).collect();
    assert_eq!(refusals.len(), 2, "{logs}");
    for l in refusals {
        assert!(l.contains("ERROR") && l.contains("code=403"), "{l}");
        assert!(l.contains("nodes/status") && l.contains("ServiceAccount"), "the line says the fix: {l}");
    }
    assert!(logs.contains("published build slots"), "{logs}");
}

#[tokio::test]
async fn missing_node_and_unreachable_api_only_log() {
    // 404: the node name is wrong; the fix names it.
    let api = Double::start(vec![node("node-a", "amd64", None, None)]).await;
    let mut p = start(api.client(), fast("node-x"), 2);
    p.until("two failures", |p| p.failures >= 2).await;
    let logs = p.logs.text();
    let end = p.stop().await;
    assert_eq!(end.slots, None);
    assert!(logs.contains("code=404") && logs.contains("no Node named \"node-x\""), "{logs}");

    // Nothing listening: transient, backing off, never giving up.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let client =
        berth_agent::publish::client_from(kube::Config::new(url.parse().unwrap()), Duration::from_secs(5)).unwrap();
    let mut p = start(client, fast("node-a"), 2);
    p.until("three failures", |p| p.failures >= 3).await;
    let logs = p.logs.text();
    let end = p.stop().await;
    assert_eq!(end.slots, None);
    assert!(end.last_error.unwrap().contains("patch node status"));
    assert!(logs.contains("Kubernetes API unavailable; retrying"), "{logs}");
}

fn cluster_nodes() -> Vec<k8s_openapi::api::core::v1::Node> {
    vec![
        node("node-a", "amd64", Some(4), Some(1)),
        node("node-b", "amd64", Some(8), Some(3)),
        node("node-c", "arm64", Some(2), Some(2)),
    ]
}

#[tokio::test]
async fn capacity_cluster_sums_the_nodes() {
    let api = Double::start(cluster_nodes()).await;
    let text = cluster::report(api.client(), RESOURCE, OutputFormat::Text).await.unwrap();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["NODE", "ARCH", "SLOTS", "IN", "USE", "FREE"], "{text}");
    assert_eq!(rows[1], ["node-a", "amd64", "4", "1", "3"], "{text}");
    assert_eq!(rows[2], ["node-b", "amd64", "8", "3", "5"], "{text}");
    assert_eq!(rows[3], ["node-c", "arm64", "2", "2", "0"], "{text}");
    assert_eq!(rows[4], ["TOTAL", "(3", "nodes)", "14", "6", "8"], "{text}");
    assert_eq!(rows[5], ["amd64", "(2", "nodes)", "12", "4", "8"], "{text}");
    assert_eq!(rows[6], ["arm64", "(1", "node)", "2", "2", "0"], "{text}");
    assert_eq!(rows.len(), 7, "{text}");
    let list = api.seen();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].method.as_str(), list[0].path.as_str()), ("GET", "/api/v1/nodes"));

    let out = cluster::report(api.client(), RESOURCE, OutputFormat::Json).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        json!([
            {"node": "node-a", "arch": "amd64", "slots": 4, "in_use": 1},
            {"node": "node-b", "arch": "amd64", "slots": 8, "in_use": 3},
            {"node": "node-c", "arch": "arm64", "slots": 2, "in_use": 2},
        ])
    );
    let sum: u64 = v.as_array().unwrap().iter().map(|r| r["slots"].as_u64().unwrap()).sum();
    assert_eq!(sum, 14);
}

#[tokio::test]
async fn capacity_cluster_marks_nodes_without_berth() {
    let mut nodes = cluster_nodes();
    nodes.push(node("gpu-0", "amd64", None, None));
    let api = Double::start(nodes).await;
    let text = cluster::report(api.client(), RESOURCE, OutputFormat::Text).await.unwrap();
    let gpu: Vec<&str> = text.lines().find(|l| l.starts_with("gpu-0")).unwrap().split_whitespace().collect();
    assert_eq!(gpu, ["gpu-0", "amd64", "-", "-", "-"], "{text}");
    assert!(
        text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["TOTAL", "(3", "nodes)", "14", "6", "8"]),
        "{text}"
    );
    assert!(text.contains("1 node without berth.dev/build"), "{text}");
    let out = cluster::report(api.client(), RESOURCE, OutputFormat::Json).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0], json!({"node": "gpu-0", "arch": "amd64", "slots": null, "in_use": null}));
}

/// The binary, end to end: `capacity --cluster` finds the API through KUBECONFIG.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_cluster_command_reads_the_kubeconfig() {
    let api = Double::start(cluster_nodes()).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let run = |args: &'static [&'static str]| {
        let kubeconfig = kubeconfig.clone();
        async move {
            let out = tokio::process::Command::new(berth_tests::harness::bin_path("berth-agent"))
                .args(args)
                .env("KUBECONFIG", &kubeconfig)
                .env_remove("BERTH_EXTENDED_RESOURCE_NAME")
                .env_remove("BERTH_CONFIG")
                .output()
                .await
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "{args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
            stdout
        }
    };
    let json_out = run(&["capacity", "--cluster", "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    let slots: Vec<u64> = v.as_array().unwrap().iter().map(|r| r["slots"].as_u64().unwrap()).collect();
    assert_eq!(slots, [4, 8, 2]);
    assert_eq!(v[2]["arch"], "arm64");
    let text = run(&["capacity", "--cluster"]).await;
    assert!(
        text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["TOTAL", "(3", "nodes)", "14", "6", "8"]),
        "{text}"
    );

    // A refusal is an error exit with the RBAC hint, not a panic.
    api.fail(Method::GET, "/api/v1/nodes", 403, 1);
    let out = tokio::process::Command::new(berth_tests::harness::bin_path("berth-agent"))
        .args(["capacity", "--cluster"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("list on nodes"), "{stderr}");
}

/// `berth-agent run` as a child process, its stderr collected.
struct Agent {
    child: tokio::process::Child,
    stderr: Arc<Mutex<String>>,
    cgroup_parent: String,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start(api: &Double, name: &str, node_name: Option<&str>, extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = api.kubeconfig(dir.path());
        let cgroup_parent = format!("berth-test/{name}-{}", std::process::id());
        // A per-process id range, far from what other tests pick.
        let idmap_base = (256 + (std::process::id() % 4096) * 4) * 65536;
        let mut cmd = tokio::process::Command::new(berth_tests::harness::bin_path("berth-agent"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("BERTH_") {
                cmd.env_remove(k);
            }
        }
        cmd.env_remove("NODE_NAME");
        if let Some(n) = node_name {
            cmd.env("NODE_NAME", n);
        }
        cmd.arg("run")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg(format!("--listen=unix://{}", dir.path().join("s.sock").display()))
            .args(["--http-addr", "off", "--daemon", "/bin/true", "--shim", "/bin/true", "--log-format", "json"])
            .args([
                "--cgroup-parent",
                &cgroup_parent,
                "--idmap-base",
                &idmap_base.to_string(),
                "--idmap-count",
                "262144",
            ])
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Agent { child, stderr, cgroup_parent, _dir: dir }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    async fn until(&self, what: &str, mut pred: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !pred() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}; agent log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and the agent exits 0.
    async fn stop(mut self) -> String {
        let pid = nix::unistd::Pid::from_raw(self.child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status =
            tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.expect("agent exits").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let log = self.log();
        assert!(status.success(), "agent exit {status}; log:\n{log}");
        log
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // The (empty) cgroup parent the agent made, in every hierarchy.
        if let Ok(dirs) = std::fs::read_dir("/sys/fs/cgroup") {
            for d in dirs.flatten() {
                let _ = std::fs::remove_dir(d.path().join(&self.cgroup_parent));
            }
        }
        let _ = std::fs::remove_dir(std::path::Path::new("/sys/fs/cgroup").join(&self.cgroup_parent));
    }
}

fn can_run_agent() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED: this test runs `berth-agent run`, which needs root (cgroups, id maps); run the suite as root"
        );
        return false;
    }
    true
}

/// The wiring in `run`: with NODE_NAME set, the agent publishes its slots
/// once it serves, and keeps serving; SIGTERM still ends it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_run_publishes_its_slots_when_node_name_is_set() {
    if !can_run_agent() {
        return;
    }
    let api = Double::start(vec![node("node-a", "amd64", None, None)]).await;
    let agent = Agent::start(&api, "publish-on", Some("node-a"), &["--max-builds", "3"]);
    agent
        .until("the status and metadata patches", || {
            !api.seen_at("PATCH", STATUS).is_empty() && !api.seen_at("PATCH", META).is_empty()
        })
        .await;
    let status = api.seen_at("PATCH", STATUS);
    assert_eq!(
        status[0].json(),
        json!([
            {"op": "add", "path": "/status/capacity/berth.dev~1build", "value": "3"},
            {"op": "add", "path": "/status/allocatable/berth.dev~1build", "value": "3"},
        ])
    );
    assert_eq!(status[0].content_type.as_deref(), Some("application/json-patch+json"));
    let node = api.node("node-a");
    assert_eq!(node.status.unwrap().capacity.unwrap()[RESOURCE].0, "3");
    let meta = node.metadata;
    assert_eq!(meta.labels.unwrap()["berth.dev/arch"], berth_shim::host::this_arch());
    assert_eq!(meta.annotations.unwrap()["berth.dev/builds-in-use"], "0");
    let log = agent.stop().await;
    assert!(log.contains("published build slots"), "{log}");
}

/// Without a node name nothing is published, with one log line saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_run_without_node_name_does_not_publish() {
    if !can_run_agent() {
        return;
    }
    let api = Double::start(vec![node("node-a", "amd64", None, None)]).await;
    let agent = Agent::start(&api, "publish-off", None, &[]);
    agent.until("the reason line", || agent.log().contains("not publishing node capacity")).await;
    let log = agent.stop().await;
    assert_eq!(log.matches("not publishing node capacity").count(), 1, "{log}");
    assert!(log.contains("NODE_NAME"), "{log}");
    assert!(api.seen().is_empty(), "{:#?}", api.seen());

    // --publish-capacity=false wins over NODE_NAME.
    let agent = Agent::start(&api, "publish-false", Some("node-a"), &["--publish-capacity=false"]);
    agent.until("the reason line", || agent.log().contains("not publishing node capacity")).await;
    agent.stop().await;
    assert!(api.seen().is_empty(), "{:#?}", api.seen());
}
