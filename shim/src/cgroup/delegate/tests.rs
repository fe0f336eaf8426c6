//! The plan and its undo on trees of plain files. The kernel's side (EBUSY,
//! controllers appearing in a child) is exercised for real in the cgroup v2
//! VM lane (tests/tests/nodeshape.rs).

use super::*;
use std::collections::BTreeMap;

struct Tree {
    _t: tempfile::TempDir,
    root: PathBuf,
    proc_root: PathBuf,
}

/// A v2 tree with the agent (this process) in `own`, and `procs` in it.
fn tree(own: &str, procs: &[u32]) -> Tree {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("cg");
    let proc_root = t.path().join("proc");
    let dir = root.join(own.trim_start_matches('/'));
    fs::create_dir_all(&dir).unwrap();
    fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
    if dir != root {
        fs::write(dir.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(dir.join("cgroup.type"), "domain\n").unwrap();
    }
    let procs: String = procs.iter().map(|p| format!("{p}\n")).collect();
    fs::write(dir.join("cgroup.procs"), procs).unwrap();
    fs::create_dir_all(proc_root.join("self")).unwrap();
    fs::write(proc_root.join("self/cgroup"), format!("0::{own}\n")).unwrap();
    Tree { _t: t, root, proc_root }
}

/// What a written `cgroup.subtree_control` means: its `+c` and `-c` applied
/// in order, as the kernel would (the plain file keeps only the last write).
fn enabled(text: &str) -> String {
    let mut on: Vec<&str> = Vec::new();
    for tok in text.split_whitespace() {
        match tok.split_at(1) {
            ("-", c) => on.retain(|x| *x != c),
            ("+", c) if !on.contains(&c) => on.push(c),
            (_, _) if !tok.starts_with(['+', '-']) && !on.contains(&tok) => on.push(tok),
            _ => {}
        }
    }
    on.sort_unstable();
    on.join(" ")
}

/// Every file and dir below `dir` with its content (subtree_control as the
/// controllers it enables; none is the same as no file): what "unchanged" means.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    fn walk(d: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(p.clone(), "<dir>".into());
                walk(&p, out);
            } else if p.ends_with("cgroup.subtree_control") {
                let on = enabled(&fs::read_to_string(&p).unwrap_or_default());
                if !on.is_empty() {
                    out.insert(p.clone(), on);
                }
            } else {
                out.insert(p.clone(), fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    walk(dir, &mut out);
    out
}

fn me() -> u32 {
    std::process::id()
}

#[test]
fn in_the_real_root_nothing_moves_and_instances_go_under_berth() {
    let t = tree("/", &[1, 2, me()]);
    let plan = plan(&t.root, &t.proc_root, None).unwrap();
    assert_eq!(plan.placement, Placement::RootChild);
    assert_eq!(plan.layout.parents[0].1, t.root.join(ROOT_CHILD));
    // A plain-file tree has no kernel to fill berth/cgroup.controllers:
    // stand in for it, so apply gets past the delegation check.
    fs::create_dir(t.root.join(ROOT_CHILD)).unwrap();
    fs::write(t.root.join("berth/cgroup.controllers"), "cpu memory pids\n").unwrap();
    let (_, mut d) = plan.apply().unwrap();
    assert_eq!(fs::read_to_string(t.root.join("cgroup.procs")).unwrap(), format!("1\n2\n{}\n", me()));
    assert!(!t.root.join(AGENT_LEAF).exists(), "no leaf at the root");
    assert_eq!(fs::read_to_string(t.root.join("cgroup.subtree_control")).unwrap(), "+memory +cpu +pids");
    assert_eq!(fs::read_to_string(t.root.join("berth/cgroup.subtree_control")).unwrap(), "+memory +cpu +pids");
    // The shared parent and the root's controllers stay for the next agent.
    let left = d.undo();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(enabled(&fs::read_to_string(t.root.join("cgroup.subtree_control")).unwrap()), "cpu memory pids");
    assert_eq!(enabled(&fs::read_to_string(t.root.join("berth/cgroup.subtree_control")).unwrap()), "cpu memory pids");
    assert_eq!(fs::read_to_string(t.root.join("cgroup.procs")).unwrap(), format!("1\n2\n{}\n", me()));
}

#[test]
fn a_namespace_root_is_not_the_real_root() {
    // In a cgroup namespace the container's cgroup reads as "/" but has a
    // cgroup.type: the no-internal-processes rule applies, so the agent
    // moves into its leaf there.
    let t = tree("/", &[me()]);
    fs::write(t.root.join("cgroup.type"), "domain\n").unwrap();
    let plan = plan(&t.root, &t.proc_root, None).unwrap();
    assert_eq!(plan.placement, Placement::OwnLeaf);
    assert_eq!(plan.layout.parents[0].1, t.root);
}

#[test]
fn others_in_the_agents_cgroup_are_named_and_nothing_moves() {
    let t = tree("/system.slice/berth.service", &[me(), 4242, 0]);
    fs::create_dir_all(t.proc_root.join("4242")).unwrap();
    fs::write(t.proc_root.join("4242/comm"), "bash\n").unwrap();
    let before = snapshot(&t.root);
    let err = plan(&t.root, &t.proc_root, None).unwrap().apply().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CgroupError::Busy { .. }), "{msg}");
    assert!(msg.contains("system.slice/berth.service/cgroup.subtree_control"), "{msg}");
    assert!(msg.contains("pid 4242 (bash)"), "{msg}");
    assert!(msg.contains("a process outside the agent's pid namespace"), "{msg}");
    assert!(msg.contains("--cgroup-parent"), "the fix is named: {msg}");
    assert_eq!(snapshot(&t.root), before, "nothing moved or created");
}

#[test]
fn own_leaf_is_undone_controllers_disabled_and_the_agent_moved_back() {
    let t = tree("/kubepods/pod1/ctr", &[me()]);
    let own = t.root.join("kubepods/pod1/ctr");
    let plan = plan(&t.root, &t.proc_root, None).unwrap();
    assert_eq!(plan.placement, Placement::OwnLeaf);
    let (layout, mut d) = plan.apply().unwrap();
    assert_eq!(layout.parents[0].1, own);
    assert_eq!(fs::read_to_string(own.join("agent/cgroup.procs")).unwrap(), me().to_string());
    assert_eq!(fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(), "+memory +cpu +pids");
    // An instance cgroup still there at exit keeps the controllers enabled.
    fs::create_dir(own.join("berth-x")).unwrap();
    let left = d.undo();
    assert!(left.iter().any(|l| l.contains("berth-x")), "{left:?}");
    assert_eq!(fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(), "+memory +cpu +pids");

    fs::remove_dir(own.join("berth-x")).unwrap();
    let (_, mut d) = plan.apply().unwrap();
    // The plain file of the leaf stands in for the kernel's: remove it so
    // rmdir can work as it does on cgroupfs.
    fs::remove_file(own.join("agent/cgroup.procs")).unwrap();
    let left = d.undo();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(), "-memory -cpu -pids");
    assert_eq!(fs::read_to_string(own.join("cgroup.procs")).unwrap(), me().to_string(), "moved back");
    assert!(!own.join(AGENT_LEAF).exists(), "leaf removed");
    assert!(d.undo().is_empty(), "a second undo does nothing");
}

#[test]
fn exec_into_a_live_agents_leaf_uses_its_placement_and_changes_nothing() {
    let t = tree("/kubepods/pod1/ctr/agent", &[me(), 1]);
    let own = t.root.join("kubepods/pod1/ctr");
    fs::write(own.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
    let before = snapshot(&t.root);
    let plan = plan(&t.root, &t.proc_root, None).unwrap();
    assert_eq!(plan.placement, Placement::InLeaf);
    assert_eq!(plan.layout.parents[0].1, own);
    let (_, mut d) = plan.apply().unwrap();
    assert!(d.undo().is_empty());
    assert_eq!(snapshot(&t.root), before);
}

#[test]
fn a_configured_parent_is_created_top_down_and_removed() {
    let t = tree("/user.slice", &[me()]);
    let plan = plan(&t.root, &t.proc_root, Some("berth-test/a/b")).unwrap();
    assert_eq!(plan.placement, Placement::Parent);
    // Without a kernel the new dirs list no controllers: the first one is
    // refused as not delegated, and the refusal removes what it created.
    let before = snapshot(&t.root);
    let err = plan.apply().unwrap_err().to_string();
    assert!(err.contains("berth-test/cgroup.controllers") && err.contains("not delegated"), "{err}");
    assert_eq!(snapshot(&t.root), before);
}

#[test]
fn probe_changes_nothing() {
    // v2, controllers not yet passed on: a throwaway child, removed.
    let t = tree("/system.slice/berth.service", &[me()]);
    let before = snapshot(&t.root);
    let p =
        plan(&t.root, &t.proc_root, None).unwrap().probe(&Limits { memory_bytes: 1 << 30, cpu_millis: 1000, pids: 64 });
    let p = p.unwrap();
    assert!(p.detail.contains("moves itself into"), "{p:?}");
    assert_eq!(p.warning, None);
    assert_eq!(snapshot(&t.root), before);
    // With another process in the way: a warning with the explanation.
    fs::write(t.root.join("system.slice/berth.service/cgroup.procs"), format!("{}\n77\n", me())).unwrap();
    let p =
        plan(&t.root, &t.proc_root, None).unwrap().probe(&Limits { memory_bytes: 1 << 30, cpu_millis: 1000, pids: 64 });
    let w = p.unwrap().warning.unwrap();
    assert!(w.contains("pid 77") && w.contains("--cgroup-parent"), "{w}");

    // v1 with a configured parent that does not exist yet: probed under the
    // nearest existing dir, the parent is not created. (The throwaway
    // cgroup's limit files are plain files here, so only cgroupfs can
    // remove it: agent/tests/check.rs compares the real tree.)
    let t = tempfile::tempdir().unwrap();
    for d in ["cg/memory", "cg/cpu,cpuacct", "cg/pids", "proc/self"] {
        fs::create_dir_all(t.path().join(d)).unwrap();
    }
    let plan = plan(&t.path().join("cg"), &t.path().join("proc"), Some("berth-test/x")).unwrap();
    let p = plan.probe(&Limits { memory_bytes: 1 << 30, cpu_millis: 1000, pids: 64 }).unwrap();
    assert!(p.detail.contains("created at start"), "{p:?}");
    for c in ["memory", "cpu,cpuacct", "pids"] {
        assert!(!t.path().join("cg").join(c).join("berth-test").exists(), "{c}");
    }
}
