//! Pod sockets handed to the daemon itself (issue 15): the agent admits on
//! a CSI pod's socket, then the daemon (fakekitd, taught `--addr fd://`)
//! accepts the pod's connections from the same listener. The suite plays
//! kubelet as csi.rs does and looks at the agent's descriptors, the kernel's
//! unix socket table and the agent's log.

use berth_agent::proto::csi_v1::node_client::NodeClient;
use berth_agent::proto::csi_v1::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest};
use berth_tests::harness::{is_instance_end, Agent, AgentBuilder};
use berth_tests::kubelet::{mount_cap, pod_ctx};
use berth_tests::pattern::{self, Checksum};
use berth_tests::podnet::{self, PodNet};
use berth_tests::proto::fake::{EchoMessage, PingRequest};
use berth_tests::{fake_client, try_channel};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

mod count;
mod sandbox;

fn builder(name: &str, extra: &[&str]) -> AgentBuilder {
    builder_http(name, "off", extra)
}

/// With the HTTP endpoint (/metrics) at `http` (`off`, or a loopback address).
fn builder_http(name: &str, http: &str, extra: &[&str]) -> AgentBuilder {
    Agent::builder(name)
        .args(["--http-addr", http, "--pod-sockets", "handoff"])
        .args(extra.iter().copied())
        .dir_arg("--csi-endpoint", "csi.sock")
        .dir_arg("--kubelet-dir", "kubelet")
        .dir_arg("--run-dir", "run")
}

async fn publish(agent: &Agent, vol: &str, pod: &str) -> PathBuf {
    let target = agent.dir().join(format!("kubelet/pods/{pod}/volumes/kubernetes.io~csi/{vol}/mount"));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let req = NodePublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap()),
        volume_context: pod_ctx(pod, "ci"),
        ..Default::default()
    };
    node(agent).await.node_publish_volume(req).await.expect("publish");
    target.join("buildkitd.sock")
}

async fn unpublish(agent: &Agent, vol: &str, pod: &str) {
    let target = agent.dir().join(format!("kubelet/pods/{pod}/volumes/kubernetes.io~csi/{vol}/mount"));
    let req = NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: target.display().to_string() };
    node(agent).await.node_unpublish_volume(req).await.expect("unpublish");
}

async fn node(agent: &Agent) -> NodeClient<tonic::transport::Channel> {
    let sock = agent.dir().join("csi.sock");
    let deadline = Instant::now() + WAIT;
    loop {
        match try_channel(&sock).await {
            Ok(c) => return NodeClient::new(c),
            Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", sock.display()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Socket inodes a process holds, from /proc/<pid>/fd.
fn socket_inodes_of(pid: u32) -> HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|t| {
                    let t = t.to_string_lossy().to_string();
                    t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn daemon_pid(agent: &Agent, id: &str) -> u32 {
    let stamp = std::fs::read_to_string(agent.state_dir().join("instances").join(id).join("daemon.pid")).unwrap();
    stamp.split_whitespace().next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_connections_reach_the_daemon_with_no_descriptor_in_the_agent() {
    let agent = builder("handoff-fds", &["--idle-timeout", "30s"]).start_async().await;
    let sock = publish(&agent, "hv-fds", "pod-fds").await;
    // The name the pod's sockets carry in the kernel: where the agent bound it.
    let bound = agent.dir().join("run/pods/hv-fds/buildkitd.sock");

    // A transfer in flight: half sent and echoed back, half to go.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoMessage>(4);
    let mut client = fake_client(&sock).await;
    let mut replies = client.echo(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    const CHUNK: usize = 256 << 10;
    const CHUNKS: u64 = 64;
    let mut sum = Checksum::new();
    for i in 0..CHUNKS / 2 {
        tx.send(EchoMessage { data: pattern::chunk(i * CHUNK as u64, CHUNK) }).await.unwrap();
        sum.update(&replies.next().await.unwrap().unwrap().data);
    }
    let ready = agent
        .wait_log(|v| v["message"] == "pod's socket handed to its instance" && v.to_string().contains("pod-fds"), WAIT)
        .expect("the pod's socket was handed to its instance");
    let id = ready["instance"].as_str().unwrap().to_string();

    let named = podnet::socket_inodes_named(&bound);
    let in_agent: HashSet<u64> = socket_inodes_of(agent.agent_pid().unwrap()).intersection(&named).copied().collect();
    let in_daemon: HashSet<u64> = socket_inodes_of(daemon_pid(&agent, &id)).intersection(&named).copied().collect();
    // The listener (in both) plus at least the transfer's connection (and
    // the connection fake_client's channel holds) in the daemon only.
    assert!(named.len() >= 2, "the pod's listener and its connection under {}: {named:?}", bound.display());
    assert_eq!(in_agent.len(), 1, "the agent holds only the pod's listener, no connection: {in_agent:?} of {named:?}");
    assert!(in_agent.is_subset(&in_daemon), "the daemon holds the same listener: {in_agent:?} vs {in_daemon:?}");
    assert!(in_daemon.len() >= 2, "the daemon holds the pod's connection: {in_daemon:?} of {named:?}");

    for i in CHUNKS / 2..CHUNKS {
        tx.send(EchoMessage { data: pattern::chunk(i * CHUNK as u64, CHUNK) }).await.unwrap();
        sum.update(&replies.next().await.unwrap().unwrap().data);
    }
    drop(tx);
    assert!(replies.next().await.is_none());
    assert_eq!(sum, pattern::expected(CHUNKS * CHUNK as u64), "the transfer's checksum");
    // The daemon serves both addresses: its instance socket (the probe's)
    // and fd:// (the pod's).
    let ping = client.ping(PingRequest {}).await.unwrap().into_inner();
    assert!(ping.addrs.iter().any(|a| a == "fd://"), "{:?}", ping.addrs);
    drop((client, replies));

    unpublish(&agent, "hv-fds", "pod-fds").await;
    let end = agent.wait_log(|v| is_instance_end(v) && v["instance"] == id.as_str(), WAIT).expect("instance ended");
    assert_eq!(end["reason"], "unpublished");
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fd_passed_instance_is_reaped_when_its_connections_are_gone() {
    let agent = builder("handoff-idle", &["--idle-timeout", "1s"]).start_async().await;
    let sock = publish(&agent, "hv-idle", "pod-idle").await;
    let mut client = fake_client(&sock).await;
    let first = client.ping(PingRequest {}).await.unwrap().into_inner();
    let ready = agent
        .wait_log(|v| v["message"] == "pod's socket handed to its instance" && v.to_string().contains("pod-idle"), WAIT)
        .unwrap();
    let id = ready["instance"].as_str().unwrap().to_string();
    // With a connection open (held by the channel) for several idle
    // timeouts, the instance lives on: the count sees the connection.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !agent.instance_ends().iter().any(|v| v["instance"] == id.as_str()),
        "reaped while the pod held a connection: {:?}",
        agent.instance_ends()
    );
    assert_eq!(client.ping(PingRequest {}).await.unwrap().into_inner().token, first.token);
    // The connection goes: reaped after the idle timeout.
    drop(client);
    let end = agent.wait_log(|v| is_instance_end(v) && v["instance"] == id.as_str(), WAIT).expect("reaped when idle");
    assert_eq!(end["reason"], "idle");
    // The pod's next connection gets a fresh instance through the same socket.
    let again = fake_client(&sock).await.ping(PingRequest {}).await.unwrap().into_inner();
    assert_ne!(again.token, first.token);
    unpublish(&agent, "hv-idle", "pod-idle").await;
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// What the pod's client does next (on the pod's thread).
enum Step {
    Ping,
    Close,
    Look,
}

/// What the pod sees after a step: Ping's token, the unix sockets named as
/// the pod's socket and the netlink sockets, both in the POD's namespace.
type Seen = (Option<String>, HashSet<u64>, HashSet<u64>);

async fn step(tx: &tokio::sync::mpsc::Sender<Step>, rx: &mut tokio::sync::mpsc::Receiver<Seen>, s: Step) -> Seen {
    tx.send(s).await.unwrap();
    tokio::time::timeout(WAIT, rx.recv()).await.expect("the pod's step").expect("the pod's client runs")
}

/// The pod's client in a network namespace of its own, as a CI pod without
/// `hostNetwork` is: the kernel puts the daemon's accepted end of each of
/// its connections in the POD's namespace, out of the agent's sock_diag
/// dump. Connected and idle for several idle timeouts, the instance lives;
/// once the pod closes, it is reaped. The agent holds none of the pod's
/// connections meanwhile, and nothing in the pod's namespace afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_with_its_own_network_keeps_its_instance_while_connected_idle() {
    let agent = builder("handoff-podnet", &["--idle-timeout", "1s"]).start_async().await;
    let sock = publish(&agent, "hv-podnet", "pod-podnet").await;
    let bound = agent.dir().join("run/pods/hv-podnet/buildkitd.sock");
    let pod = PodNet::new();
    let (step_tx, mut step_rx) = tokio::sync::mpsc::channel::<Step>(1);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<Seen>(1);
    let (s, b) = (sock.clone(), bound.clone());
    let done = pod.spawn(move || async move {
        let mut client = Some(fake_client(&s).await);
        while let Some(next) = step_rx.recv().await {
            let token = match next {
                Step::Ping => {
                    let c = client.as_mut().expect("open");
                    Some(c.ping(PingRequest {}).await.expect("ping from the pod").into_inner().token)
                }
                Step::Close => {
                    client = None;
                    None
                }
                Step::Look => None,
            };
            let seen = (token, podnet::socket_inodes_named(&b), podnet::netlink_inodes());
            seen_tx.send(seen).await.unwrap();
        }
    });
    let (first, in_pod, _) = step(&step_tx, &mut seen_rx, Step::Ping).await;
    let ready = agent
        .wait_log(
            |v| v["message"] == "pod's socket handed to its instance" && v.to_string().contains("pod-podnet"),
            WAIT,
        )
        .expect("the pod's socket was handed to its instance");
    let id = ready["instance"].as_str().unwrap().to_string();

    // The daemon's ends of the pod's connections are in the pod's namespace,
    // not in the agent's (where the listener is): the case under test.
    let in_agent_ns = podnet::socket_inodes_named(&bound);
    assert!(!in_pod.is_empty(), "the daemon's end of the pod's connection, in the pod's namespace {}", pod.netns);
    assert!(in_pod.is_disjoint(&in_agent_ns), "pod's {in_pod:?} vs agent's namespace {in_agent_ns:?}");
    agent
        .wait_log(
            |v| {
                v["message"] == "pod's connections counted in its own network namespace" && v["instance"] == id.as_str()
            },
            WAIT,
        )
        .expect("the count found the pod's namespace");
    // Idle but connected for four idle timeouts: the instance lives.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !agent.instance_ends().iter().any(|v| v["instance"] == id.as_str()),
        "reaped while the pod held a connection: {:?}",
        agent.instance_ends()
    );
    let agent_fds = socket_inodes_of(agent.agent_pid().unwrap());
    let daemon_fds = socket_inodes_of(daemon_pid(&agent, &id));
    assert!(agent_fds.is_disjoint(&in_pod), "the agent holds a pod connection: {agent_fds:?} vs {in_pod:?}");
    assert!(in_pod.is_subset(&daemon_fds), "the daemon holds the pod's connections: {in_pod:?} of {daemon_fds:?}");
    let (again, _, netlink) = step(&step_tx, &mut seen_rx, Step::Ping).await;
    assert_eq!(again, first, "the same instance answers after the idle hold");
    // The agent counts from inside the pod's namespace: a sock_diag socket.
    assert!(!agent_fds.is_disjoint(&netlink), "the agent's sock_diag socket in the pod's namespace");

    // The pod closes: reaped as idle, and the agent lets go of the namespace.
    step(&step_tx, &mut seen_rx, Step::Close).await;
    let end = agent.wait_log(|v| is_instance_end(v) && v["instance"] == id.as_str(), WAIT).expect("reaped when idle");
    assert_eq!(end["reason"], "idle");
    let every = Duration::from_millis(50);
    let (_, _, netlink) = step(&step_tx, &mut seen_rx, Step::Look).await;
    let held = |netlink: &HashSet<u64>| {
        socket_inodes_of(agent.agent_pid().unwrap()).intersection(netlink).copied().collect::<Vec<_>>()
    };
    // The count task ends with the instance's phase: give it a moment.
    berth_tests::harness::poll_async(WAIT, every, || held(&netlink).is_empty().then_some(())).await;
    assert!(held(&netlink).is_empty(), "the agent still holds a socket in the pod's namespace: {:?}", held(&netlink));
    drop(step_tx);
    tokio::time::timeout(WAIT, done).await.expect("the pod's client ended").unwrap();
    drop(pod);
    unpublish(&agent, "hv-podnet", "pod-podnet").await;
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_is_refused_on_its_socket_before_any_instance_exists() {
    let agent = builder("handoff-refuse", &["--idle-timeout", "30s", "--max-builds", "1", "--queue-size", "0"])
        .start_async()
        .await;
    let busy = publish(&agent, "hv-busy", "pod-busy").await;
    let refused = publish(&agent, "hv-refused", "pod-refused").await;
    let mut holder = fake_client(&busy).await;
    holder.ping(PingRequest {}).await.unwrap();
    // The only slot is taken and nothing may queue: the agent accepts the
    // second pod's connection and answers it with the refusal.
    let e = fake_client(&refused).await.ping(PingRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("1/1 builds running") && e.message().contains("queue full"), "{}", e.message());
    assert!(
        !agent
            .logs()
            .iter()
            .any(|v| v["message"] == "pod's socket handed to its instance" && v.to_string().contains("pod-refused")),
        "no instance for the refused pod"
    );
    // The agent keeps watching: once the slot is free, the same socket serves.
    drop(holder);
    unpublish(&agent, "hv-busy", "pod-busy").await;
    fake_client(&refused).await.ping(PingRequest {}).await.expect("served once a slot is free");
    unpublish(&agent, "hv-refused", "pod-refused").await;
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// The warm pool never serves a pod socket (a running daemon cannot take a
/// listener), but its unclaimed instances hold slots: with every slot warm,
/// a pod's connection takes the slot of one of them, which ends, instead of
/// waiting for a slot that never frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_socket_takes_the_slot_of_an_unclaimed_warm_instance() {
    let agent =
        builder("handoff-warm", &["--idle-timeout", "30s", "--max-builds", "1", "--warm", "1"]).start_async().await;
    agent
        .wait_log(|v| v["message"] == "instance ready" && v["warm"] == true, WAIT)
        .expect("the warm instance is ready");
    let sock = publish(&agent, "hv-warm", "pod-warm").await;
    let reply = tokio::time::timeout(WAIT, async { fake_client(&sock).await.ping(PingRequest {}).await })
        .await
        .expect("served, not queued for a slot that never frees")
        .expect("ping")
        .into_inner();
    let retired = agent
        .wait_log(|v| v["message"] == "an unclaimed warm instance ends to free a slot for a pod socket", WAIT)
        .expect("the warm instance gave its slot up");
    let warm_id = retired["instance"].as_str().unwrap().to_string();
    assert!(!reply.root.contains(&warm_id), "the pod got an instance of its own, not {warm_id}: {}", reply.root);
    assert!(reply.addrs.iter().any(|a| a == "fd://"), "handed the pod's socket: {:?}", reply.addrs);
    let end =
        agent.wait_log(|v| is_instance_end(v) && v["instance"] == warm_id.as_str(), WAIT).expect("warm one ended");
    assert_eq!(end["reason"], "idle");
    assert!(!agent.logs().iter().any(|v| v["message"] == "claimed a warm instance"), "nothing claimed it");
    unpublish(&agent, "hv-warm", "pod-warm").await;
    agent.sigterm();
    agent.wait_exit_async(WAIT).await.expect("agent exits");
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_with_an_fd_passed_instance_leaves_nothing_after_restart() {
    let agent = builder("handoff-kill", &["--idle-timeout", "30s"]).start_async().await;
    let sock = publish(&agent, "hv-kill", "pod-kill").await;
    let mut client = fake_client(&sock).await;
    let before = client.ping(PingRequest {}).await.unwrap().into_inner();
    agent.sigkill();
    agent.wait_exit_async(WAIT).await.expect("agent died");
    drop(client);
    agent.restart_async().await;
    // The restarted agent binds the pod's socket anew and swept the old
    // instance (its daemon held the old listener, which no path reaches).
    let every = Duration::from_millis(20);
    berth_tests::harness::poll_async(WAIT, every, || std::os::unix::net::UnixStream::connect(&sock).ok())
        .await
        .expect("the pod's socket listens again after the restart");
    let after = fake_client(&sock).await.ping(PingRequest {}).await.expect("served after the restart").into_inner();
    assert_ne!(before.token, after.token);
    unpublish(&agent, "hv-kill", "pod-kill").await;
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}
