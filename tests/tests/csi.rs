//! The CSI node plugin, end to end: the suite plays kubelet with a tonic CSI
//! client on the plugin socket, publishing into a temp kubelet dir, and
//! talks to the pods' instances through the published sockets.
//!
//! Runs on this machine's cgroup v1 and in the cgroup v2 VM lane (no Python
//! there: the socket-mode probe is a fakeclient run as another uid). The
//! harness's waits stretch with the time scale; the suite's own loop and
//! idle timeout go through `scaled` here.

use berth_agent::proto::csi_v1::identity_client::IdentityClient;
use berth_agent::proto::csi_v1::node_client::NodeClient;
use berth_agent::proto::csi_v1::{
    volume_capability, GetPluginInfoRequest, NodeGetInfoRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest,
};
use berth_tests::harness::{fakeclient, run_json, scaled, scaled_flag, Agent, AgentBuilder};
use berth_tests::kubelet::{mount_cap, pod_ctx};
use berth_tests::proto::fake::PingRequest;
use berth_tests::{fake_client, try_channel};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

/// A bound on the harness's waits (which stretch it with the time scale).
const WAIT: Duration = Duration::from_secs(20);

/// An agent serving CSI with kubelet dir, run dir and plugin socket in its
/// temp dir.
fn builder(name: &str, extra: &[&str]) -> AgentBuilder {
    let mut b = Agent::builder(name)
        .args(["--max-builds", "4", "--idle-timeout", &scaled_flag("30s"), "--http-addr", "off"])
        .dir_arg("--csi-endpoint", "csi.sock")
        .dir_arg("--kubelet-dir", "kubelet")
        .dir_arg("--run-dir", "run");
    for a in extra {
        b = b.arg(a);
    }
    b
}

/// kubelet's view: paths under the agent's temp dir.
struct Kubelet<'a> {
    agent: &'a Agent,
}

impl Kubelet<'_> {
    fn kubelet_dir(&self) -> PathBuf {
        self.agent.dir().join("kubelet")
    }
    fn target(&self, pod_uid: &str, vol: &str) -> PathBuf {
        self.kubelet_dir().join(format!("pods/{pod_uid}/volumes/kubernetes.io~csi/{vol}/mount"))
    }
    async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(channel(&self.agent.dir().join("csi.sock")).await)
    }
    fn publish_req(&self, vol: &str, pod: &str, ns: &str) -> NodePublishVolumeRequest {
        let target = self.target(pod, vol);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        NodePublishVolumeRequest {
            volume_id: vol.into(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap()),
            volume_context: pod_ctx(pod, ns),
            ..Default::default()
        }
    }
    async fn publish(&self, vol: &str, pod: &str, ns: &str) -> Result<PathBuf, tonic::Status> {
        self.node().await.node_publish_volume(self.publish_req(vol, pod, ns)).await?;
        Ok(self.target(pod, vol))
    }
    async fn unpublish(&self, vol: &str, pod: &str) -> Result<(), tonic::Status> {
        let req = NodeUnpublishVolumeRequest {
            volume_id: vol.into(),
            target_path: self.target(pod, vol).display().to_string(),
        };
        self.node().await.node_unpublish_volume(req).await.map(|_| ())
    }
}

async fn channel(sock: &Path) -> Channel {
    let deadline = std::time::Instant::now() + scaled(WAIT);
    loop {
        match try_channel(sock).await {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() > deadline => panic!("connect {}: {e}", sock.display()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn ping(sock: &Path) -> Result<berth_tests::proto::fake::PingReply, tonic::Status> {
    fake_client(sock).await.ping(PingRequest {}).await.map(|r| r.into_inner())
}

fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&dir.display().to_string()))
        .collect()
}

fn no_pod_dirs(agent: &Agent) -> Vec<String> {
    std::fs::read_dir(agent.dir().join("run/pods"))
        .map(|rd| rd.flatten().map(|e| e.path().display().to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_node_info() {
    let agent = builder("csi-identity", &["--csi-driver-name", "berth.example"]).start_async().await;
    let mut id = IdentityClient::new(channel(&agent.dir().join("csi.sock")).await);
    let info = id.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "berth.example");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let k = Kubelet { agent: &agent };
    let ni = k.node().await.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert!(!ni.node_id.is_empty());
    let arch = &ni.accessible_topology.unwrap().segments["kubernetes.io/arch"];
    assert!(arch == "amd64" || arch == "arm64", "{arch}");
    // The same name the Node label `berth.dev/arch` carries (one function).
    assert_eq!(arch, berth_agent::publish::this_arch());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_their_own_instances_and_unpublish_leaves_nothing() {
    let agent = builder("csi-pods", &[]).start_async().await;
    let k = Kubelet { agent: &agent };
    let ta = k.publish("csi-vol-a", "pod-a", "ci").await.unwrap();
    let tb = k.publish("csi-vol-b", "pod-b", "ci").await.unwrap();
    // Only the socket dir is mounted: the pod sees exactly its socket.
    let entries: Vec<String> =
        std::fs::read_dir(&ta).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    assert_eq!(entries, vec!["buildkitd.sock".to_string()]);
    let a1 = ping(&ta.join("buildkitd.sock")).await.unwrap();
    let a2 = ping(&ta.join("buildkitd.sock")).await.unwrap();
    let b1 = ping(&tb.join("buildkitd.sock")).await.unwrap();
    assert_eq!(a1.token, a2.token, "every connection of a pod reaches its one instance");
    assert_ne!(a1.token, b1.token, "two pods, two instances");
    assert_ne!(a1.uid_map, b1.uid_map);
    // The instance carries the pod's identity in the log.
    let ready = agent
        .wait_log(|v| v["message"] == "instance ready" && v.to_string().contains("pod=ci/pod-a"), WAIT)
        .expect("instance log names the pod");
    let id_a = ready["instance"].as_str().unwrap().to_string();

    // Pod b's instance socket is closed to pod a's instance root (another uid).
    let base_a: u32 = a1.uid_map.split_whitespace().nth(1).unwrap().parse().unwrap();
    let b_sock = PathBuf::from(b1.addrs[0].trim_start_matches("unix://"));
    let mut probe = fakeclient(&b_sock);
    probe.args(["ping"]).uid(base_a).gid(base_a);
    let probe = run_json(probe);
    assert!(!probe.ok(), "instance a's root reached instance b's socket: {probe:?}");
    assert_eq!(probe.json["connect_failed"], true, "{probe:?}");
    assert!(probe.error_message().is_some_and(|m| m.contains("Permission denied")), "{probe:?}");

    k.unpublish("csi-vol-a", "pod-a").await.unwrap();
    let end = agent
        .wait_log(|v| berth_tests::harness::is_instance_end(v) && v["instance"] == id_a.as_str(), WAIT)
        .expect("unpublish ends the pod's instance");
    assert_eq!(end["reason"], "unpublished");
    assert!(!ta.exists() || std::fs::read_dir(&ta).unwrap().next().is_none());
    assert!(mounts_under(&k.target("pod-a", "csi-vol-a")).is_empty());
    // Pod b is untouched by a's unpublish.
    assert_eq!(ping(&tb.join("buildkitd.sock")).await.unwrap().token, b1.token);
    k.unpublish("csi-vol-b", "pod-b").await.unwrap();
    assert!(no_pod_dirs(&agent).is_empty(), "{:?}", no_pod_dirs(&agent));
    assert!(mounts_under(agent.dir()).is_empty(), "{:?}", mounts_under(agent.dir()));
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_mount_nothing() {
    let agent = builder("csi-hostile", &[]).start_async().await;
    let k = Kubelet { agent: &agent };
    let mut node = k.node().await;
    let good = || k.publish_req("csi-vol-h", "pod-h", "ci");
    let mut cases: Vec<(&str, NodePublishVolumeRequest, Code, &str)> = Vec::new();

    let mut r = good();
    r.volume_context.remove("csi.storage.k8s.io/ephemeral");
    cases.push(("non-ephemeral", r, Code::InvalidArgument, "ephemeral"));
    let mut r = good();
    r.volume_context.remove("csi.storage.k8s.io/pod.uid");
    cases.push(("no pod info", r, Code::InvalidArgument, "podInfoOnMount"));
    let mut r = good();
    r.volume_capability.as_mut().unwrap().access_type = Some(volume_capability::AccessType::Block(Default::default()));
    cases.push(("block", r, Code::InvalidArgument, "block"));
    let mut r = good();
    r.target_path = agent.dir().join("elsewhere/mount").display().to_string();
    cases.push(("outside kubelet", r, Code::InvalidArgument, "outside"));
    let mut r = good();
    r.target_path = format!("{}/pods/pod-h/../../../../etc", k.kubelet_dir().display());
    cases.push(("dotdot", r, Code::InvalidArgument, ".."));
    std::fs::create_dir_all(agent.dir().join("victim")).unwrap();
    std::fs::create_dir_all(k.kubelet_dir().join("pods")).unwrap();
    std::os::unix::fs::symlink(agent.dir().join("victim"), k.kubelet_dir().join("pods/pod-link")).unwrap();
    let mut r = good();
    r.target_path = format!("{}/pods/pod-link/mount", k.kubelet_dir().display());
    cases.push(("symlink", r, Code::InvalidArgument, "symlink"));
    let mut r = good();
    r.volume_id = "../../escape".into();
    cases.push(("bad volume id", r, Code::InvalidArgument, "volume id"));
    // A target that already is a different mount.
    let busy = k.target("pod-busy", "csi-vol-busy");
    std::fs::create_dir_all(&busy).unwrap();
    nix::mount::mount(Some("tmpfs"), &busy, Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>).unwrap();
    let mut r = k.publish_req("csi-vol-busy", "pod-busy", "ci");
    r.target_path = busy.display().to_string();
    cases.push(("already mounted", r, Code::FailedPrecondition, "already a mount"));

    let before = mounts_under(agent.dir());
    for (name, req, code, needle) in cases {
        let e = node.node_publish_volume(req).await.expect_err(name);
        assert_eq!(e.code(), code, "{name}: {e:?}");
        assert!(e.message().contains(needle), "{name}: {}", e.message());
    }
    assert_eq!(mounts_under(agent.dir()), before, "a refused publish mounted something");
    assert!(no_pod_dirs(&agent).is_empty(), "{:?}", no_pod_dirs(&agent));
    assert!(std::fs::read_dir(agent.dir().join("victim")).unwrap().next().is_none());
    nix::mount::umount2(&busy, nix::mount::MntFlags::MNT_DETACH).unwrap();
    // The agent still serves.
    let t = k.publish("csi-vol-h", "pod-h", "ci").await.unwrap();
    ping(&t.join("buildkitd.sock")).await.unwrap();
    k.unpublish("csi-vol-h", "pod-h").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_and_concurrent_calls_converge() {
    let agent = builder("csi-idem", &[]).start_async().await;
    let k = Kubelet { agent: &agent };
    let mut joins = Vec::new();
    for _ in 0..6 {
        let req = k.publish_req("csi-vol-c", "pod-c", "ci");
        let mut node = k.node().await;
        joins.push(tokio::spawn(async move { node.node_publish_volume(req).await.map(|_| ()) }));
    }
    for j in joins {
        j.await.unwrap().expect("concurrent publish of one volume succeeds");
    }
    let target = k.target("pod-c", "csi-vol-c");
    assert_eq!(mounts_under(&target).len(), 1, "exactly one mount");
    k.publish("csi-vol-c", "pod-c", "ci").await.expect("repeated publish is idempotent");
    assert_eq!(mounts_under(&target).len(), 1);
    ping(&target.join("buildkitd.sock")).await.unwrap();

    let mut joins = Vec::new();
    for _ in 0..6 {
        let req =
            NodeUnpublishVolumeRequest { volume_id: "csi-vol-c".into(), target_path: target.display().to_string() };
        let mut node = k.node().await;
        joins.push(tokio::spawn(async move { node.node_unpublish_volume(req).await.map(|_| ()) }));
    }
    for j in joins {
        j.await.unwrap().expect("concurrent unpublish succeeds");
    }
    k.unpublish("csi-vol-c", "pod-c").await.expect("repeated unpublish is idempotent");
    k.unpublish("csi-vol-never", "pod-never").await.expect("unpublish of an unknown volume is fine");
    assert!(mounts_under(agent.dir()).is_empty());
    assert!(no_pod_dirs(&agent).is_empty());
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_policy_names_the_namespace_and_limit() {
    let agent = builder("csi-policy", &["--csi-allowed-namespaces", "ci,build", "--csi-max-per-namespace", "1"])
        .start_async()
        .await;
    let k = Kubelet { agent: &agent };
    let e = k.publish("csi-vol-p1", "pod-p1", "web").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("\"web\""), "{}", e.message());
    k.publish("csi-vol-p2", "pod-p2", "ci").await.unwrap();
    let e = k.publish("csi-vol-p3", "pod-p3", "ci").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("\"ci\"") && e.message().contains('1'), "{}", e.message());
    assert!(mounts_under(&k.target("pod-p3", "csi-vol-p3")).is_empty());
    k.publish("csi-vol-p4", "pod-p4", "build").await.expect("another namespace has its own count");
    k.unpublish("csi-vol-p2", "pod-p2").await.unwrap();
    k.unpublish("csi-vol-p4", "pod-p4").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_relistens_for_live_volumes_and_wipes_gone_ones() {
    let agent = builder("csi-restart", &[]).start_async().await;
    let k = Kubelet { agent: &agent };
    let ta = k.publish("csi-vol-ra", "pod-ra", "ci").await.unwrap();
    let tb = k.publish("csi-vol-rb", "pod-rb", "ci").await.unwrap();
    let before = ping(&ta.join("buildkitd.sock")).await.unwrap();
    agent.sigkill();
    agent.wait_exit_async(WAIT).await.expect("agent died");
    // Pod b went away while the agent was down: kubelet unmounted it.
    nix::mount::umount2(&tb, nix::mount::MntFlags::MNT_DETACH).unwrap();
    agent.restart_async().await;
    // The node socket listens before the CSI side re-listens for published
    // pods (run binds it first): wait until the pod's socket (seen through
    // the bind mount, so by connecting) answers, then call.
    let sock = ta.join("buildkitd.sock");
    let every = Duration::from_millis(20);
    berth_tests::harness::poll_async(WAIT, every, || std::os::unix::net::UnixStream::connect(&sock).ok())
        .await
        .expect("the pod's socket listens again after the restart");
    // Pod a keeps working through the same mount, on a fresh instance.
    let after = ping(&sock).await.expect("published pod works after restart");
    assert_ne!(before.token, after.token);
    assert!(!agent.dir().join("run/pods/csi-vol-rb").exists(), "gone volume's dir wiped");
    assert!(agent.dir().join("run/pods/csi-vol-ra").exists());
    k.unpublish("csi-vol-ra", "pod-ra").await.unwrap();
    k.unpublish("csi-vol-rb", "pod-rb").await.unwrap();
    assert!(mounts_under(agent.dir()).is_empty(), "{:?}", mounts_under(agent.dir()));
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}
