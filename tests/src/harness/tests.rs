use super::*;

#[test]
fn idmap_base_is_aligned_and_in_range() {
    for _ in 0..1000 {
        let b = random_idmap_base(DEFAULT_IDMAP_COUNT) as u64;
        assert_eq!(b % 65536, 0);
        assert!(b >= 1 << 24);
        assert!(b + DEFAULT_IDMAP_COUNT as u64 <= 1 << 31, "{b}");
    }
}

#[test]
fn log_lines_are_flattened() {
    let v = parse_log_line(r#"{"level":"INFO","fields":{"message":"instance ended","instance":"a1"}}"#);
    assert!(is_instance_end(&v));
    assert_eq!(v["instance"], "a1");
    let flat = parse_log_line(r#"{"level":"INFO","message":"x","instance":"b"}"#);
    assert_eq!(flat["instance"], "b");
    let spanned = parse_log_line(
        r#"{"message":"instance ready","span":{"instance":"c","name":"instance"},"spans":[{"client":"uid=0","name":"outer"}]}"#,
    );
    assert_eq!((spanned["instance"].as_str(), spanned["client"].as_str()), (Some("c"), Some("uid=0")));
    assert!(spanned.get("name").is_none());
    let raw = parse_log_line("panic: boom");
    assert_eq!(raw["message"], "panic: boom");
    assert_eq!(raw["raw"], true);
}

#[test]
fn socket_listening_needs_a_listener_and_does_not_connect() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().canonicalize().unwrap();
    let l = std::os::unix::net::UnixListener::bind(dir.join("with space.sock")).unwrap();
    l.set_nonblocking(true).unwrap();
    assert!(socket_listening(&dir.join("with space.sock")));
    assert!(!socket_listening(&dir.join("space.sock")));
    // The check made no connection.
    assert!(l.accept().is_err());
    let _d = std::os::unix::net::UnixDatagram::bind(dir.join("dgram.sock")).unwrap();
    assert!(!socket_listening(&dir.join("dgram.sock")));
    drop(l);
    assert!(!socket_listening(&dir.join("with space.sock")));
}

#[test]
fn cgroup_parent_dirs_on_a_v1_tree() {
    let t = tempfile::tempdir().unwrap();
    for d in ["memory", "pids", "cpu,cpuacct"] {
        fs::create_dir(t.path().join(d)).unwrap();
    }
    std::os::unix::fs::symlink("cpu,cpuacct", t.path().join("cpu")).unwrap();
    let dirs = cgroup_parent_dirs(t.path(), "berth-test/x");
    assert!(dirs.contains(&t.path().join("memory/berth-test/x")), "{dirs:?}");
    assert!(dirs.contains(&t.path().join("pids/berth-test/x")), "{dirs:?}");
    assert!(dirs.contains(&t.path().join("cpu,cpuacct/berth-test/x")), "{dirs:?}");
    assert!(!dirs.iter().any(|d| d.starts_with(t.path().join("cpu/"))), "{dirs:?}");
}

#[test]
fn leak_scan_sees_state_files_and_cgroups_and_cleanup_removes_cgroups() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().canonicalize().unwrap();
    let cg = dir.join("cg");
    fs::create_dir_all(cg.join("memory/berth-test/u/berth-1")).unwrap();
    fs::create_dir_all(dir.join("state/instances/abc")).unwrap();
    fs::create_dir_all(dir.join("state/leases")).unwrap();
    fs::write(dir.join("state/leases/65536"), "").unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(dir.join("state/x.sock")).unwrap();
    let scope = LeakScope {
        dir: dir.clone(),
        state_dir: dir.join("state"),
        cgroup_root: cg.clone(),
        cgroup_parent: "berth-test/u".into(),
    };
    let l = leak_scan(&scope, &[std::process::id()]);
    let has = |s: &str| l.iter().any(|x| x.contains(s));
    assert!(has("cgroup left:") && has("berth-1"), "{l:?}");
    assert!(has("instance entry left:"), "{l:?}");
    assert!(has("lease file left:"), "{l:?}");
    assert!(has("socket left:"), "{l:?}");
    assert_eq!(l.len(), 4, "{l:?}");

    fs::remove_dir(dir.join("state/instances/abc")).unwrap();
    fs::remove_file(dir.join("state/leases/65536")).unwrap();
    fs::remove_file(dir.join("state/x.sock")).unwrap();
    cleanup(&scope);
    assert!(leak_scan(&scope, &[std::process::id()]).is_empty());
    assert!(!cg.join("memory/berth-test").exists());
}

#[test]
fn leak_scan_finds_processes_naming_the_dir() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().canonicalize().unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("while :; do sleep 0.1; done")
        .arg(&dir) // $0: names the dir on the command line
        .spawn()
        .unwrap();
    let scope = LeakScope {
        dir: dir.clone(),
        state_dir: dir.join("state"),
        cgroup_root: dir.join("no-cgroups"),
        cgroup_parent: "berth-test/none".into(),
    };
    // Right after spawn() the new argv may not be visible yet: retry.
    let needle = format!("process {}", child.id());
    let mut l = Vec::new();
    for _ in 0..100 {
        l = leak_scan(&scope, &[std::process::id()]);
        if l.iter().any(|s| s.contains(&needle)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(l.iter().any(|s| s.contains(&needle)), "{l:?}");
    cleanup(&scope);
    let st = child.wait().unwrap();
    assert!(!st.success());
    assert!(leak_scan(&scope, &[std::process::id()]).is_empty());
}
