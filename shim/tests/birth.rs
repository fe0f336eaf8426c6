//! Where the daemon's life begins: born in its cgroup on cgroup v2 (clone3
//! with CLONE_INTO_CGROUP, no move on the start path), moved into it on v1
//! and wherever clone3 is refused. Needs root, as CI runs; the v2 half runs
//! in the cgroup v2 lane (tests/vm/suites: shim-birth), this host is v1.
//!
//! The refusal is real: the shim is started from a thread with a seccomp
//! filter that fails clone3 with ENOSYS (`sys::refuse_syscall_in_this_thread`),
//! as a kernel before 5.3 or a container runtime's seccomp profile does.

#[path = "support/instance.rs"]
mod instance;
use instance::*;

use berth_shim::cgroup;
use berth_shim::spec::{CgroupVersion, PidStamp, DAEMON_LOG_FILE, DAEMON_PID_FILE};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

/// Says hi, then waits; `$0` puts the dir in its cmdline for the leak scan.
const WAITER: &str = "echo hi >&2; exec sleep 1000";

/// The shim on `inst`, with its stderr (its own log lines) collected line by
/// line; started from a thread where clone3 fails when `refuse_clone3`.
fn spawn_logged(inst: &Inst, refuse_clone3: bool) -> (Child, mpsc::Receiver<String>) {
    let dir = inst.dir.clone();
    let mut child = std::thread::spawn(move || {
        if refuse_clone3 {
            berth_shim::sys::refuse_syscall_in_this_thread(libc::SYS_clone3, libc::ENOSYS)
                .expect("seccomp filter (needs root)");
        }
        Command::new(SHIM)
            .arg("run")
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    })
    .join()
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// The shim's log up to and including its "start steps" line, and the steps.
fn start_line(rx: &mpsc::Receiver<String>) -> (Vec<String>, Vec<(String, f64)>) {
    let mut seen = Vec::new();
    loop {
        let line = rx.recv_timeout(WAIT).unwrap_or_else(|_| panic!("no start steps line; the shim said {seen:?}"));
        let steps = line.split_once("; start steps: ").map(|(_, s)| berth_shim::steps::parse(s));
        seen.push(line);
        if let Some(steps) = steps {
            return (seen, steps);
        }
    }
}

fn has(steps: &[(String, f64)], name: &str) -> bool {
    steps.iter().any(|(n, _)| n == name)
}

/// The v2 cgroup of `pid` from `/proc/<pid>/cgroup` as a dir under the
/// unified root; `None` on v1.
fn v2_cgroup_of(pid: i32) -> Option<std::path::PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = cgroup::parse_proc(&text).into_iter().find(|e| e.hierarchy == "0" && e.controllers.is_empty())?.path;
    Some(Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')))
}

/// Starts a waiting daemon, checks which way it got into its cgroup and that
/// it is there with its limits, then ends it and checks nothing is left.
fn start_and_check(refuse_clone3: bool) -> Vec<String> {
    let mut inst = setup("/bin/sh", &["-c", WAITER]);
    inst.spec.args.push(inst.dir.to_string_lossy().into_owned());
    inst.spec.store().unwrap();
    let (mut child, rx) = spawn_logged(&inst, refuse_clone3);
    let (log, steps) = start_line(&rx);
    let daemon = PidStamp::load(&inst.dir.join(DAEMON_PID_FILE)).unwrap();
    assert!(cgroup::procs(&inst.spec.cgroup).contains(&daemon.pid), "daemon {} not in its cgroup", daemon.pid);
    let born_in = inst.spec.cgroup.version == CgroupVersion::V2 && !refuse_clone3;
    if born_in {
        assert!(has(&steps, "cgroup.into") && !has(&steps, "cgroup"), "born in its cgroup, not moved: {steps:?}");
        // In its cgroup from the kernel's own view, with the limits set.
        let dir = v2_cgroup_of(daemon.pid).expect("a v2 line in /proc/<pid>/cgroup");
        assert_eq!(dir, inst.spec.cgroup.dirs[0].1, "{log:?}");
        assert_eq!(fs::read_to_string(dir.join("memory.max")).unwrap().trim(), (256u64 << 20).to_string());
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap().trim(), "64");
    } else {
        assert!(has(&steps, "cgroup") && !has(&steps, "cgroup.into"), "moved into its cgroup: {steps:?}");
    }
    let refused_line = log.iter().any(|l| l.contains("could not be born in its cgroup"));
    // The daemon is exec'd, not yet run: its "hi" first (under emulation in
    // the v2 lane, the end could come before the shell got to it).
    wait_for("hi in daemon.log", || {
        fs::read_to_string(inst.dir.join(DAEMON_LOG_FILE)).unwrap_or_default().contains("hi")
    });
    drop(child.stdin.take());
    let (out, status) = outcome(child);
    assert!(out.leftovers.is_empty() && out.error.is_none() && status.success(), "{out:?}");
    assert!(out.stderr_tail.contains("hi"), "{out:?}");
    assert_gone(&inst);
    if refuse_clone3 && inst.spec.cgroup.version == CgroupVersion::V2 {
        assert!(refused_line, "the fallback is logged with its reason: {log:?}");
    } else {
        assert!(!refused_line, "{log:?}");
    }
    log
}

#[test]
fn the_daemon_is_born_in_its_cgroup_on_v2_and_moved_into_it_on_v1() {
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        eprintln!("NOTE: cgroup v1 host: checks the move path here; the clone3 path runs in the cgroup v2 lane");
    }
    start_and_check(false);
}

#[test]
fn clone3_refused_falls_back_to_the_move_and_says_why() {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if !v2 {
        eprintln!("NOTE: cgroup v1 host: the shim never tries clone3 here; this checks the move under the filter");
    }
    let log = start_and_check(true);
    if v2 {
        let line = log.iter().find(|l| l.contains("could not be born")).unwrap();
        assert!(line.contains("ENOSYS") && line.contains("favordynmods"), "{line}");
    }
}
