//! Cases 11-12: bad input keeps the agent serving; config errors exit
//! non-zero and name the flag.

use super::*;

// ---------------------------------------------------------------------------
// 11. Bad input keeps the agent serving.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_floods_keep_the_agent_serving() {
    let agent = agent("core-garbage", 2, "1s").start_async().await;
    let sock = agent.socket().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut junk = vec![0u8; 64 * 1024];
        fs::File::open("/dev/urandom").unwrap().read_exact(&mut junk).unwrap();
        // Random bytes, then close.
        let mut s = UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(&junk);
        drop(s);
        // Connect and close at once.
        drop(UnixStream::connect(&sock).unwrap());
        // An HTTP/2 preface followed by garbage frames.
        let mut s = UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let _ = s.write_all(&junk[..4096]);
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        drop(s);
        // A flood: 50 connections open at once, some with bytes, all dropped.
        let mut conns = Vec::new();
        for i in 0..50 {
            let mut s = UnixStream::connect(&sock).unwrap_or_else(|e| panic!("flood connection {i}: {e}"));
            if i % 3 == 0 {
                let _ = s.write_all(&junk[i * 100..i * 100 + 100]);
            }
            conns.push(s);
        }
        drop(conns);
        // And 50 more, each dropped at once.
        for _ in 0..50 {
            drop(UnixStream::connect(&sock).unwrap());
        }
    })
    .await
    .unwrap();

    assert_eq!(agent.try_exit_status(), None, "the agent exited on bad input:\n{}", agent.log_tail(40));
    // The flood's connections count against this client's cap until the
    // agent has seen each one closed, which for those queued behind the
    // instance's start is after the start: until then a refusal with the
    // cap's message is the right answer. Then the client is served again.
    let until = Instant::now() + scaled(Duration::from_secs(10));
    let r = loop {
        match try_ping(agent.socket()).await {
            Ok(r) => break r,
            Err(e) if e.code() == tonic::Code::ResourceExhausted && Instant::now() < until => {
                assert!(e.message().contains("--max-client-connections"), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("Ping failed: {e:?}\nagent output:\n{}", agent.log_tail(40)),
        }
    };
    assert!(!r.token.is_empty());
    // A second client too.
    let b = fc_ok(&agent, 1000, &["ping"]).await;
    assert_ne!(b["token"], r.token.as_str());
    assert_eq!(agent.try_exit_status(), None);
    end_line(&agent, &instance_id_of_root(&agent, &r.root)).await;
    end_line(&agent, &instance_id_of_root(&agent, b["root"].as_str().unwrap())).await;
    assert_clean(&agent, "after the garbage, the flood and the idle end").await;
    // Bad bytes end connections, not instances: every instance ended idle.
    let ends = agent.instance_ends();
    assert!(ends.iter().all(|v| v["reason"] == "idle"), "{ends:?}");
}

// ---------------------------------------------------------------------------
// 12. Config errors exit non-zero and name the flag.

/// Runs `berth-agent run` with a complete, valid command line plus `bad`
/// (which may override a default by name); returns (exit success, stderr).
fn run_agent_config(name: &str, bad: &[&str]) -> (bool, String) {
    let tmp = tempfile::Builder::new().prefix("berth-cfg-").tempdir().unwrap();
    // 0755 like the harness's dirs: only the bad flag may be wrong.
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let cgroup_parent = format!("berth-test/{name}-{}", std::process::id());
    let mut defaults: Vec<(String, String)> = vec![
        ("--listen".into(), format!("unix://{}/berth.sock", dir.display())),
        ("--state-dir".into(), dir.join("state").display().to_string()),
        ("--cgroup-parent".into(), cgroup_parent.clone()),
        ("--idmap-base".into(), harness::random_idmap_base(524288).to_string()),
        ("--idmap-count".into(), "524288".into()),
        ("--daemon".into(), harness::bin_path("fakekitd").display().to_string()),
        ("--shim".into(), harness::bin_path("berth-shim").display().to_string()),
        ("--max-builds".into(), "1".into()),
        ("--http-addr".into(), "127.0.0.1:0".into()),
    ];
    let mut args: Vec<String> = vec!["run".into()];
    let mut bad_it = bad.chunks(2);
    let bad_pairs: Vec<(&str, &str)> = bad_it.by_ref().map(|c| (c[0], c[1])).collect();
    defaults.retain(|(k, _)| !bad_pairs.iter().any(|(b, _)| b == k));
    for (k, v) in defaults {
        args.push(k);
        args.push(v);
    }
    for (k, v) in &bad_pairs {
        args.push(k.to_string());
        args.push(v.to_string());
    }
    let mut cmd = Command::new(harness::bin_path("berth-agent"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BERTH_") {
            cmd.env_remove(&k);
        }
    }
    let mut child = cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > scaled(Duration::from_secs(10)) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    harness::cleanup(&LeakScope {
        dir: dir.clone(),
        state_dir: dir.join("state"),
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        cgroup_parent,
    });
    eprintln!("berth-agent {bad:?}: exit {status:?}, stderr:\n{stderr}");
    match status {
        Some(st) => (st.success(), stderr),
        None => panic!(
            "berth-agent run {args:?} did not exit within {:?} (accepted the bad config); stderr:\n{stderr}",
            scaled(Duration::from_secs(10))
        ),
    }
}

#[test]
fn config_errors_exit_nonzero_naming_the_flag() {
    let (ok, err) = run_agent_config("cfg-mem", &["--build-memory", "4GB"]);
    assert!(!ok, "--build-memory 4GB accepted; stderr:\n{err}");
    assert!(err.contains("--build-memory"), "stderr does not name --build-memory:\n{err}");

    let (ok, err) = run_agent_config("cfg-daemon", &["--daemon", "/nonexistent"]);
    assert!(!ok, "--daemon /nonexistent accepted; stderr:\n{err}");
    assert!(
        err.contains("/nonexistent") && err.to_lowercase().contains("not found"),
        "stderr does not say the daemon /nonexistent was not found:\n{err}"
    );

    // Highest host id here: 1000 (cloudsdk), 0 (root) anywhere.
    let (ok, err) = run_agent_config("cfg-idmap", &["--idmap-base", "0"]);
    assert!(!ok, "--idmap-base 0 (overlapping root and every host user) accepted; stderr:\n{err}");
    assert!(err.contains("--idmap-base"), "stderr does not name --idmap-base:\n{err}");
    assert!(
        err.contains("puts a host id in the pool") && err.contains("\"root\""),
        "stderr does not say which host id is in the pool:\n{err}"
    );
}
