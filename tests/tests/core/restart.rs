//! Case 10: agent (and shim) SIGKILL mid-build, then a restart whose sweep
//! cleans what was left.

use super::*;

// ---------------------------------------------------------------------------
// 10. Agent SIGKILL mid-build, restart: the client is not left hanging, the sweep cleans.

/// Starts a long Stream as a fakeclient and waits until the instance is ready
/// and streaming; returns the client and the instance id.
async fn start_long_stream(agent: &Agent) -> (std::process::Child, String) {
    let mut cmd = fakeclient(agent.socket());
    cmd.args(["--timeout", &scaled_secs(120), "stream", "1Gi", "64Ki", "20"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let ready = agent
        .wait_log_async(0, |v| v["message"] == "instance ready", CALL)
        .await
        .unwrap_or_else(|| panic!("instance not ready; agent output:\n{}", agent.log_tail(40)));
    let id = ready["instance"].as_str().expect("instance field on the ready line").to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    (child, id)
}

/// Waits up to `limit` (stretched by the time scale) for the client to exit;
/// returns its JSON output.
async fn client_ends_within(mut child: std::process::Child, limit: Duration) -> Value {
    let limit = scaled(limit);
    let t0 = Instant::now();
    loop {
        if let Some(_st) = child.try_wait().unwrap() {
            let mut out = String::new();
            child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            return out.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the client still hangs {limit:?} after the agent was killed");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_mid_build_then_restart_sweeps() {
    let agent = agent("core-sigkill", 2, "1s").start_async().await;
    let (child, id) = start_long_stream(&agent).await;
    let inst_dir = agent.state_dir().join("instances").join(&id);
    assert!(inst_dir.is_dir());

    agent.sigkill();
    assert!(agent.wait_exit_async(Duration::from_secs(5)).await.is_some(), "agent survived SIGKILL");
    let out = client_ends_within(child, Duration::from_secs(5)).await;
    assert!(out.get("ok") != Some(&Value::Bool(true)), "the 1Gi stream completed?! {out}");

    let mark = agent.log_mark();
    agent.restart_async().await;
    agent
        .wait_log_async(mark, |v| v["message"] == "start-up sweep done", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no sweep line; output:\n{}", agent.log_tail(40)));
    assert_clean(&agent, "after SIGKILL + restart").await;
    assert!(!inst_dir.exists());
    // The restarted agent serves.
    let r = ping(&agent).await;
    assert!(!r.token.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_shim_sigkill_then_restart_sweep_deletes_the_instance() {
    use nix::sys::signal::Signal;
    let agent = agent("core-sigkill-shim", 2, "1s").start_async().await;
    let (child, id) = start_long_stream(&agent).await;
    let inst_dir = agent.state_dir().join("instances").join(&id);
    let shims = shims_of(agent.dir());
    assert!(!shims.is_empty(), "no berth-shim process names {}", agent.dir().display());
    let agent_pid = agent.pid().unwrap();

    // Freeze them first, so none of them reacts to the others' death, then kill.
    kill(agent_pid, Signal::SIGSTOP);
    for &p in &shims {
        kill(p, Signal::SIGSTOP);
    }
    for &p in &shims {
        kill(p, Signal::SIGKILL);
    }
    kill(agent_pid, Signal::SIGKILL);
    assert!(agent.wait_exit_async(Duration::from_secs(5)).await.is_some(), "agent survived SIGKILL");
    let out = client_ends_within(child, Duration::from_secs(5)).await;
    assert!(out.get("ok") != Some(&Value::Bool(true)), "{out}");
    for &p in &shims {
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{p}")).exists() && proc_argv(p).is_some_and(|a| a.contains("berth-shim")) {
            assert!(t0.elapsed() < scaled(Duration::from_secs(30)), "shim {p} survived SIGKILL");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // With agent and shim gone, the instance is left for the sweep.
    let before = agent.leak_scan();
    assert!(inst_dir.is_dir(), "instance dir already gone: nothing for the sweep to do ({before:?})");
    assert!(before.iter().any(|l| l.contains("lease file left")), "no lease left before the sweep: {before:?}");

    let mark = agent.log_mark();
    agent.restart_async().await;
    let sweep = agent
        .wait_log_async(mark, |v| v["message"] == "start-up sweep done", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no sweep line; output:\n{}", agent.log_tail(40)));
    assert!(sweep["instances"].as_u64().is_some_and(|n| n >= 1), "sweep saw no instance: {sweep}");
    assert_eq!(sweep["failures"], 0, "{sweep}");
    assert_clean(&agent, "after agent+shim SIGKILL and the restart's sweep").await;
    assert!(!inst_dir.exists());
    let r = ping(&agent).await;
    assert!(!r.token.is_empty());
}
