//! When the count of a pod's connections fails: the failure is counted on
//! /metrics by reason, the instance is kept as in use (never reaped as idle
//! under a build the agent cannot see), and it still ends when its pod's
//! volume is unpublished.
//!
//! The failure is a real one: the agent runs under a seccomp filter that
//! answers pidfd_getfd(2) with EPERM (`refuse-syscall`), as the runtimes'
//! default profile (`seccompProfile: RuntimeDefault`) does for a container
//! without CAP_SYS_PTRACE. A pod with a network namespace of its own needs
//! that call to find where its connections are (handoff/netns.rs).
//! (Dropping CAP_SYS_PTRACE alone fails nothing here: a root agent owns the
//! daemon's user namespace, which gives it ptrace access there anyway; and
//! CAP_SYS_ADMIN cannot go, CSI publish bind-mounts.)

use super::*;

fn metrics(agent: &Agent) -> String {
    use std::io::{Read, Write};
    let addr = agent.http_addr(WAIT).expect("http address");
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// The value of the sample `name` (with its labels) on /metrics.
fn sample(agent: &Agent, name: &str) -> f64 {
    let body = metrics(agent);
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
}

const FAILURES: &str = "berth_handoff_count_failures_total{reason=\"pidfd_getfd\"}";
const UNCOUNTED: &str = "berth_handoff_uncounted_instances";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_that_fails_is_on_metrics_and_keeps_the_instance_until_unpublish() {
    let (nr, eperm) = (libc::SYS_pidfd_getfd.to_string(), libc::EPERM.to_string());
    let agent = builder_http("handoff-nocount", "127.0.0.1:0", &["--idle-timeout", "1s"])
        .wrapper([berth_tests::harness::bin_path("refuse-syscall").display().to_string(), nr, eperm, "--".into()])
        .start_async()
        .await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.agent_pid().unwrap())).unwrap();
    assert!(status.contains("Seccomp:\t2"), "the agent runs under the filter:\n{status}");
    assert_eq!(sample(&agent, FAILURES), 0.0, "pre-created at 0");
    let sock = publish(&agent, "hv-nocount", "pod-nocount").await;

    // The pod's client, in a network namespace of its own, connected and
    // idle until told to close.
    let pod = PodNet::new();
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    let (token_tx, token_rx) = tokio::sync::oneshot::channel::<String>();
    let s = sock.clone();
    let done = pod.spawn(move || async move {
        let mut client = fake_client(&s).await;
        let token = client.ping(PingRequest {}).await.expect("ping from the pod").into_inner().token;
        token_tx.send(token).unwrap();
        let _ = close_rx.await;
        drop(client);
    });
    let first = tokio::time::timeout(WAIT, token_rx).await.expect("the pod's ping").unwrap();
    let ready = agent
        .wait_log(
            |v| v["message"] == "pod's socket handed to its instance" && v.to_string().contains("pod-nocount"),
            WAIT,
        )
        .expect("handed to its instance");
    let id = ready["instance"].as_str().unwrap().to_string();

    // The count fails, says why, and shows on /metrics.
    let warned = agent
        .wait_log(
            |v| {
                v["message"].as_str().is_some_and(|m| m.starts_with("cannot count the pod's connections"))
                    && v["instance"] == id.as_str()
            },
            WAIT,
        )
        .unwrap_or_else(|| panic!("no count failure logged:\n{}", agent.log_tail(30)));
    assert_eq!(warned["reason"], "pidfd_getfd", "{warned}");
    assert!(warned["error"].as_str().unwrap().contains("CAP_SYS_PTRACE"), "{warned}");
    let every = Duration::from_millis(50);
    berth_tests::harness::poll_async(WAIT, every, || (sample(&agent, FAILURES) >= 1.0).then_some(())).await;
    let before = sample(&agent, FAILURES);
    assert!(before >= 1.0, "{FAILURES} = {before}");
    assert_eq!(sample(&agent, UNCOUNTED), 1.0);

    // Connected and idle for four idle timeouts: kept (the agent cannot
    // tell this from a running build); each count that fails is counted.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !agent.instance_ends().iter().any(|v| v["instance"] == id.as_str()),
        "reaped while the pod held a connection the agent could not count: {:?}",
        agent.instance_ends()
    );
    assert!(sample(&agent, FAILURES) > before, "the failures go on being counted");

    // The pod closes: still not reaped as idle (nothing says it is idle) ...
    close_tx.send(()).unwrap();
    tokio::time::timeout(WAIT, done).await.expect("the pod's client ended").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!agent.instance_ends().iter().any(|v| v["instance"] == id.as_str()), "{:?}", agent.instance_ends());
    // ... and its pod going ends it.
    unpublish(&agent, "hv-nocount", "pod-nocount").await;
    let end = agent.wait_log(|v| is_instance_end(v) && v["instance"] == id.as_str(), WAIT).expect("ended at unpublish");
    assert_eq!(end["reason"], "unpublished");
    berth_tests::harness::poll_async(WAIT, every, || (sample(&agent, UNCOUNTED) == 0.0).then_some(())).await;
    assert_eq!(sample(&agent, UNCOUNTED), 0.0, "off the gauge once ended");
    assert!(!first.is_empty());
    drop(pod);
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}
