//! The real `berth-shim` binary on real namespaces and cgroups (needs root,
//! as CI runs): an instance dir is set up by hand exactly as the agent
//! does, the daemon is `/bin/sh` with a script, and every test checks that
//! nothing of the instance is left afterwards.

use berth_shim::cgroup;
use berth_shim::spec::{EndReason, Outcome, PidStamp, DAEMON_LOG_FILE, DAEMON_PID_FILE, SHIM_PID_FILE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

#[path = "support/instance.rs"]
mod instance;
use instance::*;

/// `(fd, link target)` of a process's open fds, sorted by fd number.
fn fds_of(pid: i32) -> Vec<(String, PathBuf)> {
    let mut fds: Vec<(String, PathBuf)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_string_lossy().into_owned(), fs::read_link(e.path()).ok()?)))
        .collect();
    fds.sort_by_key(|(fd, _)| fd.parse::<u32>().unwrap_or(u32::MAX));
    fds
}

/// The open flags of a process's fd, from `/proc/<pid>/fdinfo/<fd>`.
fn fd_flags(pid: i32, fd: &str) -> i32 {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap();
    i32::from_str_radix(flags.trim(), 8).unwrap()
}

/// Writes what the daemon sees into root/info (atomically), says hi on
/// stderr, then runs a child forever. As pid 1 without a TERM trap, sh
/// ignores SIGTERM, so the shim's SIGKILL after the grace ends it.
const LONG: &str = r#"
echo hi >&2
{ cat /proc/self/uid_map; cat /proc/self/gid_map; echo "pid=$$"; echo "host=$(cat /proc/sys/kernel/hostname)"; echo "uid=$(id -u)"; } > info.tmp
mv info.tmp info; sleep 1000; echo never"#;

fn words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn daemon_runs_mapped_in_its_namespaces_and_lifeline_close_tears_down() {
    let inst = setup("/bin/sh", &["-c", LONG]);
    // $0 of the script: puts the dir in the daemon's cmdline for the scan.
    let mut inst = inst;
    inst.spec.args.push(inst.dir.to_string_lossy().into_owned());
    inst.spec.store().unwrap();
    // Through a shell that leaves fds 7 and 8 (dups of the lifeline and the
    // outcome pipe) open across exec, as a careless agent could: the shim
    // must not pass them on.
    let mut child = Command::new("/bin/sh")
        .args(["-c", r#"exec 7<&0 8>&1; exec "$0" run "$1""#, SHIM])
        .arg(&inst.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let info = read_when_there(&inst.dir.join("root/info"));
    let base = inst.spec.ids.host_base;
    let lines: Vec<&str> = info.lines().collect();
    assert_eq!(words(lines[0]), format!("0 {base} 65536"), "{info}");
    assert_eq!(words(lines[1]), format!("0 {base} 65536"), "{info}");
    assert_eq!(lines[2], "pid=1");
    assert_eq!(lines[3], "host=berth-test");
    assert_eq!(lines[4], "uid=0");

    let daemon = PidStamp::load(&inst.dir.join(DAEMON_PID_FILE)).unwrap();
    let shim = PidStamp::load(&inst.dir.join(SHIM_PID_FILE)).unwrap();
    assert_eq!(shim.pid as u32, child.id());
    assert!(cgroup::procs(&inst.spec.cgroup).contains(&daemon.pid));
    // The daemon's fds, seen from the host while it waits for its child:
    // stdin /dev/null, stdout and stderr one pipe (the shim copies it to
    // daemon.log), and nothing else (no lifeline or handshake pipe leaked in).
    let fds = fds_of(daemon.pid);
    assert_eq!(fds.len(), 3, "{fds:?}");
    assert_eq!(fds[0], ("0".to_string(), PathBuf::from("/dev/null")));
    let pipe = fds[1].1.clone();
    assert!(pipe.to_string_lossy().starts_with("pipe:["), "{fds:?}");
    assert_eq!(fds[1..], [("1".to_string(), pipe.clone()), ("2".to_string(), pipe.clone())]);
    assert_eq!(fd_flags(daemon.pid, "1") & libc::O_ACCMODE, libc::O_WRONLY);
    assert_eq!(fd_flags(daemon.pid, "1") & libc::O_NONBLOCK, 0, "the daemon's end stays blocking");
    // The shim holds the read end only (its copy of the write end is closed,
    // or the pipe would never reach EOF), non-blocking for its poll loop.
    let shim_ends: Vec<String> = fds_of(shim.pid).into_iter().filter(|(_, l)| *l == pipe).map(|(fd, _)| fd).collect();
    assert_eq!(shim_ends.len(), 1, "{shim_ends:?}");
    let flags = fd_flags(shim.pid, &shim_ends[0]);
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
    assert_ne!(flags & libc::O_NONBLOCK, 0);
    assert!(fs::read_to_string(inst.dir.join(DAEMON_LOG_FILE)).unwrap().contains("hi"));
    let log_mode = fs::metadata(inst.dir.join(DAEMON_LOG_FILE)).unwrap().permissions().mode();
    assert_eq!(log_mode & 0o777, 0o600);
    assert!(!cmdlines_with(&inst.dir.to_string_lossy()).is_empty());

    drop(child.stdin.take()); // the agent "dies"
    let (out, status) = outcome(child);
    assert_eq!(out.reason, EndReason::ParentGone);
    assert_eq!(out.id, inst.spec.id);
    assert!(out.stderr_tail.contains("hi"), "{out:?}");
    assert_eq!(out.signal, Some(9), "sh as pid 1 ignores SIGTERM: SIGKILL after the grace");
    assert!(out.leftovers.is_empty() && out.error.is_none(), "{out:?}");
    assert!(out.peak_memory.is_some_and(|m| m > 0), "{out:?}");
    assert!(status.success());
    assert!(!running(&daemon));
    assert_gone(&inst);
}

/// Runs `sh -c script` as the daemon, waits for its "hi" in daemon.log,
/// SIGTERMs the shim and returns its outcome.
fn term_after_hi(script: &str, grace_ms: u64) -> (Inst, Outcome, ExitStatus) {
    let mut inst = setup("/bin/sh", &["-c", script]);
    inst.spec.stop_grace_ms = grace_ms;
    inst.spec.store().unwrap();
    let child = spawn(&inst);
    wait_for("hi in daemon.log", || {
        fs::read_to_string(inst.dir.join(DAEMON_LOG_FILE)).unwrap_or_default().contains("hi")
    });
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let (out, status) = outcome(child);
    (inst, out, status)
}

#[test]
fn sigterm_stops_a_daemon_that_handles_it_within_the_grace() {
    let script = r#"trap 'echo bye >&2; exit 0' TERM; echo hi >&2; while :; do sleep 0.05; done"#;
    let (inst, out, status) = term_after_hi(script, 300);
    assert_eq!(out.reason, EndReason::Stopped);
    assert_eq!((out.exit_code, out.signal), (Some(0), None), "{out:?}");
    assert!(out.stderr_tail.contains("hi\nbye"), "{out:?}");
    assert!(out.leftovers.is_empty() && status.success(), "{out:?}");
    assert_gone(&inst);
}

#[test]
fn output_of_a_daemon_stopping_within_the_grace_is_drained_so_it_exits_cleanly() {
    // Its TERM handler writes 1 MiB, far more than a pipe holds: unless the
    // shim reads while it waits out the grace, the daemon blocks and is
    // SIGKILLed instead of exiting 0.
    let script = r#"trap 'yes bye | head -c 1048576 >&2; echo done >&2; exit 0' TERM; echo hi >&2; while :; do sleep 0.05; done"#;
    // A grace long enough for 1 MiB on a loaded machine: without the
    // draining the daemon blocks for good and is SIGKILLed after it anyway.
    let (inst, out, status) = term_after_hi(script, 20_000);
    assert_eq!(out.reason, EndReason::Stopped);
    assert_eq!((out.exit_code, out.signal), (Some(0), None), "{out:?}");
    assert!(out.stderr_tail.ends_with("bye\nbye\ndone"), "{out:?}");
    assert!(out.leftovers.is_empty() && status.success(), "{out:?}");
    assert_gone(&inst);
}

/// One line of the chatty daemon's output: 63 characters and a newline, so
/// that its 3 MiB and the 1 MiB cap are whole lines.
const LINE: &str = "chatty-daemon-output-0123456789-abcdefghijklmnopqrstuvwxyz-0123";

#[test]
fn chatty_daemon_output_is_capped_in_the_file_never_blocks_and_its_last_words_reach_the_outcome() {
    assert_eq!(LINE.len(), 63);
    let cap: u64 = 1 << 20;
    let lines = (3u64 << 20) / 64;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let last = format!("last-words-{}-{nanos}", std::process::id());
    // 3 MiB on stderr, a unique last line, then a marker in its cwd (root/):
    // the marker only appears if nothing blocked the daemon on the way.
    let script = format!("yes {LINE} | head -n {lines} >&2; echo {last} >&2; touch written; sleep 1000");
    let mut inst = setup("/bin/sh", &["-c", &script]);
    inst.spec.log_cap_bytes = cap;
    inst.spec.store().unwrap();
    let mut child = spawn(&inst);
    let log = inst.dir.join(DAEMON_LOG_FILE);
    let marker = inst.dir.join("root/written");
    let max_note = format!("\nberth-shim: daemon.log capped at {cap} bytes; {} bytes dropped\n", u64::MAX).len() as u64;
    let mut samples = 0;
    wait_for("the daemon to write all its output and go on", || {
        let size = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        assert!(size <= cap + max_note, "daemon.log has {size} bytes while the daemon writes (cap {cap})");
        samples += 1;
        marker.exists()
    });
    let daemon = PidStamp::load(&inst.dir.join(DAEMON_PID_FILE)).unwrap();
    assert!(running(&daemon), "the daemon went on to its sleep");

    // The shim keeps draining while the instance runs: the one note line
    // soon counts every byte past the cap, and the file is the output's
    // first `cap` bytes (whole lines here, so the note needs no newline).
    let dropped = 3u64 * (1 << 20) + last.len() as u64 + 1 - cap;
    let note = format!("berth-shim: daemon.log capped at {cap} bytes; {dropped} bytes dropped\n");
    wait_for("the note to count every dropped byte", || fs::read(&log).unwrap().ends_with(note.as_bytes()));
    let content = fs::read(&log).unwrap();
    assert_eq!(content.len() as u64, cap + note.len() as u64, "{samples} samples");
    let line = format!("{LINE}\n");
    assert!(content[..cap as usize].chunks(64).all(|l| l == line.as_bytes()));

    drop(child.stdin.take());
    let (out, status) = outcome(child);
    assert_eq!(out.reason, EndReason::ParentGone);
    let tail = &out.stderr_tail;
    // The daemon's last words, not the file's end (the note), in whole lines.
    assert!(tail.ends_with(&format!("{LINE}\n{last}")), "tail ends with {:?}", &tail[tail.len().saturating_sub(200)..]);
    assert!(tail.len() <= 4096 && tail.len() > 4096 - 64, "{}", tail.len());
    assert!(tail.lines().all(|l| l == LINE || l == last), "{tail:.200}");
    assert!(out.leftovers.is_empty() && out.error.is_none() && status.success(), "{out:?}");
    assert!(!running(&daemon));
    assert_gone(&inst);
}

#[test]
fn daemon_exit_is_reported_with_code_and_tail() {
    let inst = setup("/bin/sh", &["-c", "echo boom >&2; exit 3"]);
    let (out, status) = outcome(spawn(&inst));
    assert_eq!(out.reason, EndReason::DaemonExited);
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stderr_tail, "boom");
    assert!(out.leftovers.is_empty() && out.error.is_none() && status.success(), "{out:?}");
    assert_gone(&inst);
}

#[test]
fn exec_failure_is_a_start_failure_with_the_error_in_the_tail() {
    let inst = setup("/nonexistent/berthd", &["--root", "x"]);
    let (out, status) = outcome(spawn(&inst));
    assert_eq!(out.reason, EndReason::StartFailed);
    assert_eq!(out.exit_code, Some(127));
    let want = "exec /nonexistent/berthd: ENOENT";
    assert!(out.stderr_tail.contains(want), "{out:?}");
    assert!(out.error.as_deref().is_some_and(|e| e.contains(want)), "{out:?}");
    assert!(out.leftovers.is_empty() && status.success(), "{out:?}");
    assert_gone(&inst);
}

#[test]
fn a_failed_parent_step_kills_the_child_and_cleans_up() {
    let mut inst = setup("/bin/sh", &["-c", "echo never >&2"]);
    // The kernel refuses a map of zero ids: the uid_map write fails after
    // the child exists and blocks on the handshake.
    inst.spec.ids.count = 0;
    inst.spec.store().unwrap();
    let (out, status) = outcome(spawn(&inst));
    assert_eq!(out.reason, EndReason::StartFailed);
    let err = out.error.clone().unwrap_or_default();
    assert!(err.contains("uid_map") && err.contains("Invalid argument"), "{out:?}");
    assert!(!out.stderr_tail.contains("never"), "{out:?}");
    assert!(out.leftovers.is_empty() && status.success(), "{out:?}");
    // The child was a clone of the shim, with the dir in its cmdline.
    assert_gone(&inst);
}

#[test]
fn shim_sigkill_takes_the_daemon_along_and_delete_cleans_the_rest() {
    let mut inst = setup("/bin/sh", &["-c", LONG]);
    inst.spec.args.push(inst.dir.to_string_lossy().into_owned());
    inst.spec.store().unwrap();
    let mut child = spawn(&inst);
    read_when_there(&inst.dir.join("root/info"));
    let daemon = PidStamp::load(&inst.dir.join(DAEMON_PID_FILE)).unwrap();
    assert!(running(&daemon));
    child.kill().unwrap();
    child.wait().unwrap();
    // PR_SET_PDEATHSIG, set after the id switch, kills the daemon.
    wait_for("the daemon to die with the shim", || !running(&daemon));
    assert!(inst.dir.exists() && inst.spec.lease.exists());

    for round in 0..2 {
        let res = Command::new(SHIM).arg("delete").arg(&inst.dir).output().unwrap();
        let out: Outcome = serde_json::from_slice(&res.stdout).unwrap();
        assert_eq!(out.reason, EndReason::Deleted);
        assert!(res.status.success() && out.leftovers.is_empty(), "round {round}: {out:?}");
        if round == 0 {
            assert_eq!(out.id, inst.spec.id);
            assert!(out.stderr_tail.contains("hi"), "{out:?}");
        }
        assert_gone(&inst);
    }
}

#[test]
fn delete_kills_a_live_shim_and_its_daemon() {
    let mut inst = setup("/bin/sh", &["-c", LONG]);
    inst.spec.args.push(inst.dir.to_string_lossy().into_owned());
    inst.spec.store().unwrap();
    let mut child = spawn(&inst);
    read_when_there(&inst.dir.join("root/info"));
    let res = Command::new(SHIM).arg("delete").arg(&inst.dir).output().unwrap();
    let out: Outcome = serde_json::from_slice(&res.stdout).unwrap();
    assert!(res.status.success() && out.leftovers.is_empty(), "{out:?}");
    assert!(!child.wait().unwrap().success(), "the shim was SIGKILLed");
    assert_gone(&inst);
}

#[test]
fn delete_without_a_spec_still_wipes_the_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("orphan");
    fs::create_dir_all(dir.join("root/deep")).unwrap();
    fs::write(dir.join("root/deep/f"), "x").unwrap();
    fs::write(dir.join("spec.json"), "{ not json").unwrap();
    let res = Command::new(SHIM).arg("delete").arg(&dir).output().unwrap();
    let out: Outcome = serde_json::from_slice(&res.stdout).unwrap();
    assert!(res.status.success(), "{out:?}");
    assert!(out.error.as_deref().is_some_and(|e| e.contains("spec.json")), "{out:?}");
    assert!(!dir.exists());
}

#[test]
fn run_without_a_spec_touches_nothing_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nospec");
    fs::create_dir(&dir).unwrap();
    let child = Command::new(SHIM).arg("run").arg(&dir).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let (out, status) = outcome(child);
    assert_eq!(out.reason, EndReason::StartFailed);
    assert_eq!(status.code(), Some(1));
    assert!(dir.exists() && out.error.is_some());
}

#[test]
fn probe_userns_succeeds_here() {
    let res = Command::new(SHIM).arg("probe-userns").output().unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
}

#[test]
fn bad_usage_exits_2_with_usage() {
    for args in [&[][..], &["bogus"][..], &["run"][..], &["delete", "a", "b"][..]] {
        let res = Command::new(SHIM).args(args).output().unwrap();
        assert_eq!(res.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&res.stderr).contains("usage: berth-shim run"), "{args:?}");
    }
}

#[test]
fn isolated_network_has_only_loopback_and_it_is_up() {
    let script = "readlink /proc/self/ns/net > net; ip -o link show > links; echo done > marker; exec sleep 1000";
    let mut inst = setup("/bin/sh", &["-c", script]);
    inst.spec.isolate_network = true;
    inst.spec.stop_grace_ms = 100;
    inst.spec.store().unwrap();
    let child = spawn(&inst);
    read_when_there(&inst.dir.join("root/marker"));
    let net = fs::read_to_string(inst.dir.join("root/net")).unwrap();
    let host = fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(net.trim(), host.to_string_lossy(), "the daemon got its own network namespace");
    let links = fs::read_to_string(inst.dir.join("root/links")).unwrap();
    assert_eq!(links.lines().count(), 1, "only loopback: {links}");
    assert!(links.contains(": lo:") && links.contains("UP"), "lo is up: {links}");
    stop_shim(child);
    assert_gone(&inst);
}
