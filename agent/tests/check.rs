//! `berth-agent check` on the real host (root): a fit node passes, and a
//! state dir on overlayfs (as in a container's own root fs) is refused with
//! the fix, while overlayfs-in-userns is reported as unavailable there.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::Path;
use std::process::Command;

fn check(state: &Path) -> (i32, String) {
    let shim = Path::new(env!("CARGO_BIN_EXE_berth-agent")).with_file_name("berth-shim");
    let out = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
        .args(["check", "--daemon", "/bin/true", "--state-dir"])
        .arg(state)
        .arg("--shim")
        .arg(&shim)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn state_dir_on_overlayfs_fails_with_the_fix() {
    let t = tempfile::tempdir().unwrap();
    let (code, out) = check(&t.path().join("state"));
    let line = |name: &str| {
        out.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{name} missing:\n{out}")).to_string()
    };
    assert!(line("user namespaces").starts_with("ok"), "{out}");
    assert!(line("overlayfs").starts_with("ok"), "{out}");
    assert!(line("state dir").starts_with("ok"), "{out}");
    // /bin/true is no buildkitd: runc is not required, so only real misses fail.
    assert_eq!(code, 0, "{out}");

    for d in ["l", "u", "w", "m"] {
        std::fs::create_dir(t.path().join(d)).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        t.path().join("l").display(),
        t.path().join("u").display(),
        t.path().join("w").display()
    );
    let m = t.path().join("m");
    mount(Some("overlay"), &m, Some("overlay"), MsFlags::empty(), Some(opts.as_str())).unwrap();
    let (code, out) = check(&m.join("state"));
    umount2(&m, MntFlags::MNT_DETACH).unwrap();
    assert_eq!(code, 1, "{out}");
    let state = out.lines().find(|l| l.contains("state dir")).unwrap();
    assert!(state.starts_with("FAIL") && state.contains("overlayfs"), "{out}");
    assert!(out.contains("not on overlayfs"), "the fix is printed:\n{out}");
    let ovl = out.lines().find(|l| l.contains("overlayfs ")).unwrap();
    assert!(ovl.starts_with("warn"), "{out}");
}

/// Every cgroup dir (in every hierarchy) whose path contains `mark`, with
/// its processes and the controllers it passes on.
fn cgroups_marked(mark: &str) -> Vec<(String, String, String)> {
    fn walk(d: &Path, mark: &str, out: &mut Vec<(String, String, String)>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if p.to_string_lossy().contains(mark) {
                    let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
                    out.push((p.display().to_string(), read("cgroup.procs"), read("cgroup.subtree_control")));
                }
                walk(&p, mark, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), mark, &mut out);
    out.sort();
    out
}

fn check_with(args: &[&str], state: &Path, wrap_in: Option<&Path>) -> String {
    let shim = Path::new(env!("CARGO_BIN_EXE_berth-agent")).with_file_name("berth-shim");
    let mut cmd = Command::new("sh");
    let enter = wrap_in.map(|c| format!("echo $$ > {}/cgroup.procs || exit 97; ", c.display())).unwrap_or_default();
    cmd.arg("-c").arg(format!("{enter}exec \"$@\"")).arg("check").arg(env!("CARGO_BIN_EXE_berth-agent"));
    cmd.args(["check", "--daemon", "/bin/true", "--state-dir"]).arg(state).arg("--shim").arg(&shim).args(args);
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `check` with a `--cgroup-parent` that does not exist yet probes beside
/// it and leaves no dir behind, run after run (v1 here, v2 in the VM lane).
#[test]
fn check_leaves_the_cgroup_tree_as_it_found_it() {
    let t = tempfile::tempdir().unwrap();
    let mark = format!("berth-checktest-{}", std::process::id());
    let parent = format!("{mark}/deep");
    let before = cgroups_marked(&mark);
    assert!(before.is_empty(), "{before:?}");
    for run in 0..2 {
        let out = check_with(&["--cgroup-parent", &parent], &t.path().join("state"), None);
        let line = out.lines().find(|l| l.contains("cgroups")).unwrap_or_default();
        assert!(line.starts_with("ok"), "run {run}: {out}");
        assert_eq!(cgroups_marked(&mark), before, "run {run}: the tree changed:\n{out}");
    }
}

/// cgroup v2: `check` from inside a service's cgroup where another process
/// runs moves neither, enables nothing, and warns about the process that
/// would stop `run` (the VM lane runs this; v1 hosts say SKIPPED).
#[test]
fn check_in_a_busy_v2_cgroup_moves_nothing_and_names_the_process() {
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        eprintln!("SKIPPED: check in a busy v2 cgroup: needs a cgroup v2 host (this one is v1); the cgroup v2 VM lane runs it (tests/vm/run.sh)");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mark = format!("berth-checktest-{}.service", std::process::id());
    let svc = Path::new("/sys/fs/cgroup").join(&mark);
    std::fs::create_dir(&svc).unwrap();
    let mut sleeper = Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {}/cgroup.procs && exec sleep 600", svc.display()))
        .spawn()
        .unwrap();
    let pid = sleeper.id();
    while !std::fs::read_to_string(svc.join("cgroup.procs")).unwrap_or_default().contains(&pid.to_string()) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let before = cgroups_marked(&mark);
    let out = check_with(&[], &t.path().join("state"), Some(&svc));
    let after = cgroups_marked(&mark);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let _ = std::fs::remove_dir(&svc);
    // The check itself was in the cgroup while it ran, and is gone now.
    let strip = |v: Vec<(String, String, String)>| -> Vec<(String, String, String)> {
        v.into_iter().map(|(d, p, s)| (d, p.lines().filter(|l| *l == pid.to_string()).collect(), s)).collect()
    };
    assert_eq!(strip(after), strip(before), "the tree changed:\n{out}");
    let line = out.lines().find(|l| l.contains("cgroups")).unwrap_or_default();
    assert!(line.starts_with("warn"), "{out}");
    assert!(out.contains(&format!("pid {pid} (sleep)")) && out.contains("--cgroup-parent"), "{out}");
}

/// The "cgroup moves" line on the real host: informational at worst, never
/// FAIL; on cgroup v2 (the VM lane) the daemons are born in their cgroup,
/// on v1 (this host) each start moves its daemon and the line says at what
/// cost, matching the favordynmods state of the host's cgroup mounts.
#[test]
fn check_cgroup_moves_line_matches_the_host() {
    let t = tempfile::tempdir().unwrap();
    let out = check_with(&[], &t.path().join("state"), None);
    let line =
        out.lines().find(|l| l.contains("cgroup moves")).unwrap_or_else(|| panic!("no cgroup moves line:\n{out}"));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let favoring = mountinfo.lines().any(|l| {
        l.split_once(" - ").is_some_and(|(_, t)| {
            t.starts_with("cgroup") && t.split(' ').nth(2).is_some_and(|o| o.split(',').any(|o| o == "favordynmods"))
        })
    });
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let old = berth_shim::cgroup::moves::kernel_version(&release).is_some_and(|k| k < (6, 0));
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        assert!(line.starts_with("ok") && line.contains("born in their cgroup"), "{out}");
    } else if old {
        assert!(line.starts_with("ok") && line.contains("cheap before Linux 6.0"), "{out}");
    } else if favoring {
        assert!(line.starts_with("ok") && line.contains("favordynmods"), "{out}");
    } else {
        assert!(line.starts_with("info") && line.contains("RCU grace period"), "{out}");
        assert!(out.contains("remount the cgroup2 hierarchy with favordynmods"), "the fix is printed:\n{out}");
    }
}
