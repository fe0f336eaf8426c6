//! A warm sandbox (`--warm-stage sandbox`) serves a pod's socket: its
//! daemon has not exec'd yet, so the pod's listener goes with the go and the
//! daemon starts on it (`--addr fd://`). The pod is served by the sandbox
//! made ahead, the agent holds none of its connections, idle reaping counts
//! them as for a cold fd-passed instance, and the pool makes a new sandbox.

use super::*;

fn held_ids(agent: &Agent) -> Vec<String> {
    let held = agent.logs().into_iter().filter(|v| v["message"] == "sandbox held");
    held.filter_map(|v| v["instance"].as_str().map(String::from)).collect()
}

async fn wait_held(agent: &Agent, n: usize) -> Vec<String> {
    let every = Duration::from_millis(20);
    berth_tests::harness::poll_async(WAIT, every, || Some(held_ids(agent)).filter(|ids| ids.len() >= n))
        .await
        .unwrap_or_else(|| panic!("{n} sandboxes held:\n{}", agent.log_tail(30)))
}

fn exe_name(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_socket_is_served_by_a_warm_sandbox_with_its_listener() {
    let extra = ["--idle-timeout", "1s", "--max-builds", "3", "--warm", "1", "--warm-stage", "sandbox"];
    let agent = builder("handoff-sandbox", &extra).start_async().await;
    let id = wait_held(&agent, 1).await.remove(0);
    let pid = daemon_pid(&agent, &id);
    assert_eq!(exe_name(pid), "berth-shim", "held before exec");

    let sock = publish(&agent, "hv-sb", "pod-sb").await;
    let bound = agent.dir().join("run/pods/hv-sb/buildkitd.sock");
    let mut client = fake_client(&sock).await;
    let first = client.ping(PingRequest {}).await.expect("served").into_inner();
    let handed = agent
        .wait_log(|v| v["message"] == "pod's socket handed to a warm sandbox", WAIT)
        .expect("the pod's socket went to the sandbox");
    assert_eq!(handed["instance"], id.as_str(), "{handed}");
    assert!(first.addrs.iter().any(|a| a == "fd://"), "the daemon serves the pod's listener: {:?}", first.addrs);
    assert!(first.root.contains(&id), "served by the sandbox made ahead: {}", first.root);
    assert_eq!(exe_name(pid), "fakekitd", "the held child became the daemon");
    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(agent.state_dir().join("instances").join(&id).join("spec.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(spec["listen_fd"], true, "recorded as fd-passed: {spec}");

    // The agent holds the listener and none of the pod's connections; the
    // daemon holds the same listener and the connection.
    let named = podnet::socket_inodes_named(&bound);
    let in_agent: HashSet<u64> = socket_inodes_of(agent.agent_pid().unwrap()).intersection(&named).copied().collect();
    let in_daemon: HashSet<u64> = socket_inodes_of(pid).intersection(&named).copied().collect();
    assert_eq!(in_agent.len(), 1, "only the pod's listener in the agent: {in_agent:?} of {named:?}");
    assert!(in_agent.is_subset(&in_daemon), "{in_agent:?} vs {in_daemon:?}");
    assert!(in_daemon.len() >= 2, "the daemon holds the pod's connection: {in_daemon:?}");

    // Connected for several idle timeouts: it lives; closed: reaped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!agent.instance_ends().iter().any(|v| v["instance"] == id.as_str()), "reaped while connected");
    assert_eq!(client.ping(PingRequest {}).await.unwrap().into_inner().token, first.token);
    drop(client);
    let end = agent.wait_log(|v| is_instance_end(v) && v["instance"] == id.as_str(), WAIT).expect("reaped when idle");
    assert_eq!(end["reason"], "idle");
    // The pool made a new sandbox, and the pod's next connection takes it.
    let ids = wait_held(&agent, 2).await;
    let again = fake_client(&sock).await.ping(PingRequest {}).await.expect("served again").into_inner();
    assert_ne!(again.token, first.token);
    assert!(again.root.contains(&ids[1]), "the pool's next sandbox: {} vs {ids:?}", again.root);
    unpublish(&agent, "hv-sb", "pod-sb").await;
    agent.sigterm();
    agent.wait_exit_async(WAIT).await.expect("agent exits");
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "{leaks:?}");
}
