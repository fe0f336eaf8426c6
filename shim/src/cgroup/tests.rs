use super::*;
use std::process::Command;

fn tree_v2() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("cg");
    let proc_root = t.path().join("proc");
    fs::create_dir_all(root.join("kubepods/pod1")).unwrap();
    fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
    fs::write(root.join("kubepods/pod1/cgroup.controllers"), "cpu memory pids\n").unwrap();
    fs::write(root.join("kubepods/pod1/cgroup.procs"), format!("{}\n", std::process::id())).unwrap();
    fs::create_dir_all(proc_root.join("self")).unwrap();
    fs::write(proc_root.join("self/cgroup"), "0::/kubepods/pod1\n").unwrap();
    (t, root, proc_root)
}

#[test]
fn v2_nests_under_own_cgroup_moves_only_the_agent_to_its_leaf_and_writes_limits() {
    let (_t, root, proc_root) = tree_v2();
    let plan = delegate::plan(&root, &proc_root, None).unwrap();
    let (layout, _undo) = plan.apply().unwrap();
    assert_eq!(layout.version, CgroupVersion::V2);
    let parent = root.join("kubepods/pod1");
    assert_eq!(layout.parents, vec![("unified".to_string(), parent.clone())]);
    // The agent (this process) moved into the leaf, nothing else.
    assert_eq!(fs::read_to_string(parent.join("agent/cgroup.procs")).unwrap(), std::process::id().to_string());
    assert_eq!(fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap(), "+memory +cpu +pids");

    let lim = Limits { memory_bytes: 256 << 20, cpu_millis: 500, pids: 100 };
    let spec = layout.create("berth-x", &lim).unwrap();
    let d = parent.join("berth-x");
    assert_eq!(fs::read_to_string(d.join("memory.max")).unwrap(), "268435456");
    assert_eq!(fs::read_to_string(d.join("cpu.max")).unwrap(), "50000 100000");
    assert_eq!(fs::read_to_string(d.join("pids.max")).unwrap(), "100");
    assert_eq!(layout.children("berth-"), vec![d.clone()]);

    fs::write(d.join("memory.peak"), "1234\n").unwrap();
    fs::write(d.join("memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
    fs::write(d.join("pids.events"), "max 7\n").unwrap();
    assert_eq!(usage(&spec), Usage { peak_memory: Some(1234), oom_kills: 1, pids_limit_hits: 7 });
}

#[test]
fn v2_refuses_a_parent_without_delegated_controllers() {
    let (_t, root, proc_root) = tree_v2();
    fs::write(root.join("kubepods/pod1/cgroup.controllers"), "cpu\n").unwrap();
    let err = delegate::plan(&root, &proc_root, None).unwrap().apply().unwrap_err().to_string();
    assert!(err.contains("[\"memory\", \"pids\"]") && err.contains("--cgroup-parent"), "{err}");
}

#[test]
fn v1_uses_each_controllers_own_path_and_co_mounts() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("cg");
    for d in ["memory/a/b", "cpu,cpuacct", "pids"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::create_dir_all(t.path().join("proc/self")).unwrap();
    fs::write(t.path().join("proc/self/cgroup"), "5:pids:/\n4:memory:/a/b\n2:cpu,cpuacct:/\n0::/\n").unwrap();
    let (layout, _undo) = delegate::plan(&root, &t.path().join("proc"), None).unwrap().apply().unwrap();
    assert_eq!(layout.version, CgroupVersion::V1);
    assert_eq!(layout.parents[0].1, root.join("memory/a/b"));
    assert_eq!(layout.parents[1].1, root.join("cpu,cpuacct"));
    let lim = Limits { memory_bytes: 1 << 30, cpu_millis: 1500, pids: 64 };
    let spec = layout.create("berth-y", &lim).unwrap();
    let mem = root.join("memory/a/b/berth-y");
    assert_eq!(fs::read_to_string(mem.join("memory.limit_in_bytes")).unwrap(), "1073741824");
    assert_eq!(fs::read_to_string(root.join("cpu,cpuacct/berth-y/cpu.cfs_quota_us")).unwrap(), "150000");
    assert_eq!(fs::read_to_string(root.join("pids/berth-y/pids.max")).unwrap(), "64");
    // A configured parent is created where it is missing, and stays for the
    // next agent.
    let (l2, mut undo) = delegate::plan(&root, &t.path().join("proc"), Some("/berth/test")).unwrap().apply().unwrap();
    assert!(l2.parents.iter().all(|(_, p)| p.ends_with("berth/test") && p.is_dir()));
    assert!(undo.undo().is_empty());
    assert!(l2.parents.iter().all(|(_, p)| p.is_dir()));
    let _ = spec;
}

#[test]
fn v1_missing_controller_is_named() {
    let t = tempfile::tempdir().unwrap();
    fs::create_dir_all(t.path().join("cg/memory")).unwrap();
    let err = delegate::plan(&t.path().join("cg"), t.path(), Some("x")).unwrap_err().to_string();
    assert!(err.contains("cpu controller"), "{err}");
}

/// Real cgroups of this host: a process joins, is counted, is killed, and
/// the cgroup is removed. Needs root (CI runs as root).
#[test]
fn real_host_cgroup_lifecycle() {
    let root = Path::new("/sys/fs/cgroup");
    // A parent of its own: in the root cgroup (the VM lane) or in this
    // process's cgroup on v2, no process of the test runner is moved.
    let parent = format!("berth-unittest-{}", std::process::id());
    let plan = delegate::plan(root, Path::new("/proc"), Some(&parent)).unwrap();
    let (layout, mut undo) = plan.apply().expect("host cgroups usable (run as root)");
    let name = format!("berth-unittest-{}", std::process::id());
    let spec = layout.create(&name, &Limits { memory_bytes: 64 << 20, cpu_millis: 500, pids: 16 }).unwrap();
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    join(&spec, child.id() as i32).unwrap();
    assert_eq!(procs(&spec), vec![child.id() as i32]);
    kill_all(&spec, Duration::from_secs(5)).unwrap();
    let _ = child.wait();
    assert!(procs(&spec).is_empty());
    remove(&spec, Duration::from_secs(5)).unwrap();
    assert!(spec.dirs.iter().all(|(_, d)| !d.exists()));
    assert!(undo.undo().is_empty());
    for (_, p) in &layout.parents {
        fs::remove_dir(p).unwrap();
    }
}

#[test]
fn path_of_reads_v1_and_v2_entries() {
    let t = tempfile::tempdir().unwrap();
    fs::create_dir_all(t.path().join("7")).unwrap();
    fs::write(t.path().join("7/cgroup"), "4:memory:/m\n1:cpu,cpuacct:/c\n0::/u\n").unwrap();
    assert_eq!(path_of(t.path(), "7", "cpu").unwrap(), "/c");
    assert_eq!(path_of(t.path(), "7", "").unwrap(), "/u");
    assert!(path_of(t.path(), "7", "pids").is_err());
}

#[test]
fn parse_proc_keeps_paths_with_colons() {
    let e = parse_proc("3:name=systemd:/a:b\n0::/u\nbroken\n");
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].path, "/a:b");
    assert!(e[0].has("name=systemd") && !e[0].has(""));
    assert!(e[1].has(""));
}

#[test]
fn ceiling_reads_v2_limits_and_max() {
    let t = tempfile::tempdir().unwrap();
    let (root, proc_root) = (t.path().join("cg"), t.path().join("proc"));
    fs::create_dir_all(root.join("pod")).unwrap();
    fs::create_dir_all(proc_root.join("self")).unwrap();
    fs::write(root.join("cgroup.controllers"), "cpu memory\n").unwrap();
    fs::write(proc_root.join("self/cgroup"), "0::/pod\n").unwrap();
    fs::write(root.join("pod/memory.max"), "2147483648\n").unwrap();
    fs::write(root.join("pod/cpu.max"), "150000 100000\n").unwrap();
    let c = ceiling_of(&root, &proc_root, "self").unwrap();
    assert_eq!(c, Ceiling { memory: Some(2 << 30), millicpus: Some(1500) });
    fs::write(root.join("pod/memory.max"), "max\n").unwrap();
    fs::write(root.join("pod/cpu.max"), "max 100000\n").unwrap();
    assert_eq!(ceiling_of(&root, &proc_root, "self").unwrap(), Ceiling::default());
}

#[test]
fn ceiling_reads_v1_limits_and_ignores_unlimited() {
    let t = tempfile::tempdir().unwrap();
    let (root, proc_root) = (t.path().join("cg"), t.path().join("proc"));
    fs::create_dir_all(root.join("memory/a")).unwrap();
    fs::create_dir_all(root.join("cpu/b")).unwrap();
    fs::create_dir_all(proc_root.join("9")).unwrap();
    fs::write(proc_root.join("9/cgroup"), "4:memory:/a\n2:cpu,cpuacct:/b\n").unwrap();
    fs::write(root.join("memory/a/memory.limit_in_bytes"), "1073741824\n").unwrap();
    fs::write(root.join("cpu/b/cpu.cfs_quota_us"), "50000\n").unwrap();
    fs::write(root.join("cpu/b/cpu.cfs_period_us"), "100000\n").unwrap();
    let c = ceiling_of(&root, &proc_root, "9").unwrap();
    assert_eq!(c, Ceiling { memory: Some(1 << 30), millicpus: Some(500) });
    fs::write(root.join("memory/a/memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
    fs::write(root.join("cpu/b/cpu.cfs_quota_us"), "-1\n").unwrap();
    assert_eq!(ceiling_of(&root, &proc_root, "9").unwrap(), Ceiling::default());
}
