//! Cases 8-9: planted symlinks are not followed by the wipe; a daemon that
//! fails to start or never gets ready is UNAVAILABLE and leaves nothing.

use super::*;

// ---------------------------------------------------------------------------
// 8. Symlinks planted in the state dir are not followed by the wipe.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wipe_does_not_follow_planted_symlinks() {
    let agent = agent("core-symlink", 2, "1s").start_async().await;
    let victims = tempfile::Builder::new().prefix("berth-victims-").tempdir().unwrap();
    let vdir = victims.path().canonicalize().unwrap();
    let victim = vdir.join("victim.txt");
    fs::write(&victim, "victim file: must survive the wipe\n").unwrap();
    fs::create_dir(vdir.join("dir")).unwrap();
    fs::write(vdir.join("dir/keep.txt"), "keep me\n").unwrap();
    fs::create_dir(vdir.join("dir/sub")).unwrap();
    fs::write(vdir.join("dir/sub/deep.txt"), "deep\n").unwrap();
    // A marker beside the agent's own state dir, reached by a relative link.
    let marker = agent.dir().join("marker.txt");
    fs::write(&marker, "marker\n").unwrap();

    let mut c = fake_client(agent.socket()).await;
    let links: Vec<(String, String)> = vec![
        (victim.display().to_string(), "victim-file".into()),
        (vdir.join("dir").display().to_string(), "victim-dir".into()),
        (vdir.join("dir").display().to_string(), "nested/a/b/victim-dir".into()),
        (vdir.display().to_string(), "nested/victims".into()),
        // root/ -> instance dir -> instances -> state -> the agent's temp dir
        ("../../../..".into(), "up".into()),
        (agent.dir().display().to_string(), "agent-dir".into()),
        ("/".into(), "slash".into()),
    ];
    for (target, link_name) in &links {
        c.symlink(SymlinkRequest { target: target.clone(), link_name: link_name.clone() })
            .await
            .unwrap_or_else(|e| panic!("Symlink {link_name} -> {target}: {e:?}"));
    }
    let r = c.ping(PingRequest {}).await.unwrap().into_inner();
    let id = instance_id_of_root(&agent, &r.root);
    let planted = Path::new(&r.root).join("victim-dir");
    assert!(
        fs::symlink_metadata(&planted).unwrap().file_type().is_symlink(),
        "{} is not a symlink on the host",
        planted.display()
    );
    drop(c);

    let end = end_line(&agent, &id).await;
    assert_eq!(end["reason"], "idle", "{end}");
    assert_clean(&agent, "after the wipe").await;
    assert_eq!(fs::read_to_string(&victim).ok().as_deref(), Some("victim file: must survive the wipe\n"));
    assert_eq!(fs::read_to_string(vdir.join("dir/keep.txt")).ok().as_deref(), Some("keep me\n"));
    assert_eq!(fs::read_to_string(vdir.join("dir/sub/deep.txt")).ok().as_deref(), Some("deep\n"));
    assert_eq!(fs::read_to_string(&marker).ok().as_deref(), Some("marker\n"));
    assert!(agent.socket().exists(), "the agent's socket was removed");
    assert!(agent.state_dir().join("leases").is_dir(), "the lease dir was removed");
    assert!(Path::new("/etc/passwd").exists());
    // The agent still serves.
    let again = ping(&agent).await;
    assert_ne!(again.token, r.token);
}

// ---------------------------------------------------------------------------
// 9. A daemon that fails to start, or never becomes ready: UNAVAILABLE, nothing left.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_start_failure_is_unavailable_and_leaves_nothing() {
    let unique = format!("fail-start-{}-{}", std::process::id(), rand_tag());
    let agent = agent("core-fail-start", 2, "1s").daemon_arg(&format!("--fail-start={unique}")).start_async().await;
    let t0 = Instant::now();
    let err = try_ping(agent.socket()).await.expect_err("Ping succeeded with a daemon that fails to start");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&unique), "message lacks the daemon's stderr {unique:?}: {err:?}");
    // A daemon that exits fails the start at once, not after the 30s
    // default start timeout (stretched with the time scale: the harness
    // stretches the agent's start timeout too).
    let start_timeout = scaled(Duration::from_secs(30));
    assert!(t0.elapsed() < start_timeout, "waited for the start timeout {start_timeout:?}: {:?}", t0.elapsed());
    assert_clean(&agent, "after the failed start").await;
    assert_eq!(agent.try_exit_status(), None, "agent exited");

    let slow = agent_slow().start_async().await;
    let t0 = Instant::now();
    let err = try_ping(slow.socket()).await.expect_err("Ping succeeded with a daemon that never gets ready");
    let took = t0.elapsed();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let msg = err.message().to_lowercase();
    assert!(
        msg.contains("1s") && ["did not answer", "timed out", "timeout", "not ready"].iter().any(|w| msg.contains(w)),
        "message does not mention the 1s start timeout: {err:?}"
    );
    // Ruled out: waiting for the daemon's start delay instead of the 1s start timeout.
    assert!(took < slow_start_delay(), "refusal took {took:?} with --start-timeout 1s");
    assert_clean(&slow, "after the start timeout").await;
}

/// fakekitd's start delay in the slow-start case: far beyond the 1 s start
/// timeout even on a machine the time scale stretches.
fn slow_start_delay() -> Duration {
    scaled(Duration::from_secs(60))
}

fn agent_slow() -> AgentBuilder {
    agent("core-slow-start", 2, "1s")
        .arg("--start-timeout")
        .arg("1s")
        .daemon_arg(&format!("--start-delay={}", slow_start_delay().as_millis()))
}

fn rand_tag() -> String {
    berth_shim::host::random_id()
}
