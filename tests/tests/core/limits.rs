//! Cases 5-7: the memory and pids limits end only their instance; the
//! idle end leaves nothing.

use super::*;

// ---------------------------------------------------------------------------
// 5. OOM kills only that instance.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_kills_only_that_instance() {
    // A's instance must stay while B's starts (~30 s under emulation): an
    // idle timeout well past one instance start, and below END for B's end.
    let agent = agent("core-oom", 2, "8s").arg("--build-memory").arg("64Mi").start_async().await;
    let a = fc_ok(&agent, 1000, &["ping"]).await;
    let b = fc_ok(&agent, 1001, &["ping"]).await;
    let ia = instance_id_of_root(&agent, a["root"].as_str().unwrap());
    let tb = b["token"].as_str().unwrap().to_string();

    // The allocation, and B's pings while it runs.
    let mut alloc = fc(&agent, 1000, &["alloc", "256Mi"]);
    alloc.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
    let alloc_child = alloc.spawn().unwrap();
    let alloc_task = tokio::task::spawn_blocking(move || {
        let out = alloc_child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    let mut during = 0;
    while !alloc_task.is_finished() || during == 0 {
        let r = fc_ok(&agent, 1001, &["ping"]).await;
        assert_eq!(r["token"], tb.as_str(), "B's instance changed while A hit its memory limit");
        during += 1;
        if during > 200 {
            panic!("alloc of 256Mi over a 64Mi limit did not end");
        }
    }
    let out = alloc_task.await.unwrap();
    let json: Value = out.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
    assert!(json.get("error").is_some_and(Value::is_object), "A's 256Mi alloc over a 64Mi limit did not fail: {out}");

    let end = end_line(&agent, &ia).await;
    assert_eq!(end["oom_killed"], true, "{end}");
    assert_eq!(end["reason"], "oom", "{end}");

    // B still answers, same instance, and did not end.
    let after = fc_ok(&agent, 1001, &["ping"]).await;
    assert_eq!(after["token"], tb.as_str());
    let ib = instance_id_of_root(&agent, b["root"].as_str().unwrap());
    assert!(!agent.instance_ends().iter().any(|v| v["instance"] == ib.as_str()), "B's instance ended along with A's");
    let eb = end_line(&agent, &ib).await;
    assert_eq!(eb["reason"], "idle", "{eb}");
    assert_eq!(eb["oom_killed"], false, "{eb}");
    assert_clean(&agent, "after the OOM and B's idle end").await;
}

// ---------------------------------------------------------------------------
// 6. The pids limit fails only that instance.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_limit_fails_only_that_instance() {
    let agent = agent("core-pids", 2, "2s").arg("--build-pids").arg("32").start_async().await;
    let a = fc_ok(&agent, 1000, &["ping"]).await;
    let ia = instance_id_of_root(&agent, a["root"].as_str().unwrap());
    let fa = fc_ok(&agent, 1000, &["fork", "64"]).await;
    let started = fa["started"].as_u64().unwrap();
    assert!(started < 64, "64 forks under a pids limit of 32 all started: {fa}");
    assert!(!fa["error"].as_str().unwrap().is_empty(), "no fork error reported: {fa}");
    let a2 = fc_ok(&agent, 1000, &["ping"]).await;
    assert_eq!(a2["token"], a["token"], "the forks went to another instance");
    assert_eq!(a2["children"].as_u64(), Some(started), "{a2}");

    let b = fc_ok(&agent, 1001, &["ping"]).await;
    assert_ne!(b["token"], a["token"]);
    let fb = fc_ok(&agent, 1001, &["fork", "8"]).await;
    assert_eq!(fb["started"], 8, "the other instance cannot fork: {fb}");
    assert_eq!(fb["error"], "", "{fb}");

    let end = end_line(&agent, &ia).await;
    assert!(end["pids_limit_hits"].as_u64().is_some_and(|n| n > 0), "pids_limit_hits not > 0 in {end}");
    let ib = instance_id_of_root(&agent, b["root"].as_str().unwrap());
    let eb = end_line(&agent, &ib).await;
    assert_eq!(eb["pids_limit_hits"], 0, "{eb}");
    assert_clean(&agent, "after both ended").await;
}

// ---------------------------------------------------------------------------
// 7. After the idle end nothing of the instance is left.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_end_leaves_nothing() {
    let agent = agent("core-leak", 2, "1s")
        .args(["--build-memory", "192Mi", "--build-cpus", "500m", "--build-pids", "300"])
        .start_async()
        .await;
    let mut c = fake_client(agent.socket()).await;
    let w = c
        .write_files(WriteFilesRequest { count: 20, size_bytes: 64 * 1024, subdir: "cache/layers".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.files_written, 20);
    let f = c.fork(ForkRequest { count: 4 }).await.unwrap().into_inner();
    assert_eq!(f.started, 4, "{f:?}");
    let r = c.ping(PingRequest {}).await.unwrap().into_inner();
    let id = instance_id_of_root(&agent, &r.root);
    let inst_dir = agent.state_dir().join("instances").join(&id);

    let cgroups = instance_cgroup_dirs(&r.cgroup, &id);
    assert_limits(&cgroups, &r.cgroup);
    let mut host_pids = Vec::new();
    for d in &cgroups {
        assert!(d.is_dir(), "instance cgroup {} missing while alive", d.display());
        let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap();
        host_pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    host_pids.sort_unstable();
    host_pids.dedup();
    assert!(host_pids.len() >= 5, "daemon + 4 sleepers not in the cgroups: {host_pids:?}");
    let (lo, _) = single_range(&r.uid_map);
    let lease = agent.state_dir().join("leases").join(lo.to_string());
    assert!(lease.exists(), "no lease {} while alive", lease.display());
    assert!(inst_dir.is_dir());
    drop(c);

    let end = end_line(&agent, &id).await;
    assert_eq!(end["reason"], "idle", "{end}");
    assert_clean(&agent, "after the idle end").await;
    assert!(!inst_dir.exists(), "{} left", inst_dir.display());
    assert!(!lease.exists(), "lease {} left", lease.display());
    for d in &cgroups {
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
    for pid in host_pids {
        if let Some(argv) = proc_argv(pid) {
            assert!(
                !argv.contains(agent.dir().to_string_lossy().as_ref()),
                "instance process {pid} still running: {argv}"
            );
        }
    }
}

/// The limits of `idle_end_leaves_nothing`'s agent (192Mi, 500m, 300 pids)
/// in the instance's cgroup files: on v1 one dir per controller hierarchy,
/// on v2 the one unified dir with the controllers enabled and no swap.
fn assert_limits(cgroups: &[PathBuf], proc_cgroup: &str) {
    let read = |d: &Path, f: &str| {
        fs::read_to_string(d.join(f)).unwrap_or_else(|e| panic!("{}: {e}", d.join(f).display())).trim().to_string()
    };
    let mem = (192u64 << 20).to_string();
    if cgroup_v2() {
        assert_eq!(cgroups.len(), 1, "not one v2 cgroup in {proc_cgroup:?}: {cgroups:?}");
        let d = &cgroups[0];
        let enabled = read(d, "cgroup.controllers");
        for want in ["memory", "pids", "cpu"] {
            assert!(enabled.split_whitespace().any(|c| c == want), "{want} not enabled in {}: {enabled}", d.display());
        }
        assert_eq!(read(d, "memory.max"), mem, "{}", d.display());
        if d.join("memory.swap.max").exists() {
            assert_eq!(read(d, "memory.swap.max"), "0", "{}", d.display());
        }
        assert_eq!(read(d, "cpu.max"), "50000 100000", "{}", d.display());
        assert_eq!(read(d, "pids.max"), "300", "{}", d.display());
        return;
    }
    let of = |want: &str| {
        cgroups
            .iter()
            .find(|d| {
                let h = d.strip_prefix("/sys/fs/cgroup").unwrap().components().next().unwrap();
                h.as_os_str().to_string_lossy().split(',').any(|x| x == want)
            })
            .unwrap_or_else(|| panic!("no {want} cgroup in {proc_cgroup:?}"))
    };
    assert_eq!(read(of("memory"), "memory.limit_in_bytes"), mem);
    assert_eq!(read(of("cpu"), "cpu.cfs_quota_us"), "50000");
    assert_eq!(read(of("cpu"), "cpu.cfs_period_us"), "100000");
    assert_eq!(read(of("pids"), "pids.max"), "300");
}
