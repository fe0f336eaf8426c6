//! A warm sandbox (`Spec::hold`): the real `berth-shim run` makes the whole
//! instance, prints `held` and keeps its child before exec until the go
//! byte on its lifeline; a stop or the lifeline's end while held ends the
//! sandbox without the daemon ever running, and leaves nothing.

use berth_shim::spec::{EndReason, Outcome, PidStamp, DAEMON_LOG_FILE, DAEMON_PID_FILE, GO_BYTE, HELD_LINE};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout};
use std::sync::mpsc;

#[path = "support/instance.rs"]
mod instance;
use instance::*;

/// Writes a marker (atomically) and sleeps: the daemon ran.
const DAEMON: &str = "echo ran >&2; echo ran > ran.tmp; mv ran.tmp ran; exec sleep 1000";

/// The shim's stdout lines, as they come.
fn lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}

fn held(inst: &Inst) -> (Child, mpsc::Receiver<String>, PidStamp) {
    let mut child = spawn(inst);
    let rx = lines(child.stdout.take().unwrap());
    let first = rx.recv_timeout(WAIT).expect("the shim says it holds");
    assert_eq!(first, HELD_LINE);
    let stamp = PidStamp::parse(&fs::read_to_string(inst.dir.join(DAEMON_PID_FILE)).unwrap()).unwrap();
    (child, rx, stamp)
}

fn outcome_of(rx: &mpsc::Receiver<String>, child: &mut Child) -> Outcome {
    let line = rx.recv_timeout(WAIT).expect("the shim's outcome");
    child.wait().unwrap();
    serde_json::from_str(&line).unwrap()
}

fn exe(pid: i32) -> String {
    fs::read_link(format!("/proc/{pid}/exe")).map(|p| p.display().to_string()).unwrap_or_default()
}

fn with_hold(daemon_script: &str) -> Inst {
    let mut inst = setup("/bin/sh", &["-c", daemon_script]);
    inst.spec.hold = true;
    inst.spec.store().unwrap();
    inst
}

#[test]
fn a_held_sandbox_execs_its_daemon_only_on_the_go_byte() {
    let inst = with_hold(DAEMON);
    let (mut child, rx, stamp) = held(&inst);
    // Made: the child exists in its own namespaces and cgroup, mapped, but
    // it is still the shim's copy, not the daemon.
    let pid = stamp.pid;
    assert_eq!(exe(pid), SHIM_PATH.to_string(), "the held child has not exec'd");
    let ns = |p: &str| fs::read_link(p).unwrap();
    assert_ne!(ns(&format!("/proc/{pid}/ns/user")), ns("/proc/self/ns/user"));
    assert_ne!(ns(&format!("/proc/{pid}/ns/pid")), ns("/proc/self/ns/pid"));
    let uid_map = fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    assert!(uid_map.split_whitespace().nth(1) == Some(&inst.spec.ids.host_base.to_string()), "{uid_map}");
    // Set up ahead, so a claim leaves only the exec: root of its namespace
    // (the mapped root on the host) with its own /proc mounted.
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    assert_eq!(uid.split_whitespace().next(), Some(inst.spec.ids.host_base.to_string().as_str()), "{status}");
    let mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let procs = mounts.lines().filter(|l| l.split_whitespace().nth(4) == Some("/proc")).count();
    assert!(procs >= 2, "its own /proc over the host's: {mounts}");
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let (_, first) = &inst.spec.cgroup.dirs[0];
    assert!(cg.contains(first.file_name().unwrap().to_str().unwrap()), "joined its cgroup while held: {cg}");
    // However long it waits: nothing ran.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!inst.dir.join("root/ran").exists(), "the daemon ran before the go");
    assert_eq!(fs::read_to_string(inst.dir.join(DAEMON_LOG_FILE)).unwrap_or_default(), "");

    child.stdin.as_mut().unwrap().write_all(&[GO_BYTE]).unwrap();
    read_when_there(&inst.dir.join("root/ran"));
    // The same pid is now the daemon: the sandbox made ahead is the one used.
    assert_ne!(exe(pid), SHIM_PATH.to_string(), "the held child exec'd the daemon");
    assert!(running(&stamp));
    drop(child.stdin.take());
    let out = outcome_of(&rx, &mut child);
    assert_eq!(out.reason, EndReason::ParentGone, "{out:?}");
    assert!(out.leftovers.is_empty(), "{out:?}");
    assert_gone(&inst);
}

#[test]
fn a_held_sandbox_stopped_or_abandoned_never_runs_its_daemon() {
    // Stopped (the agent drains, or retires an unclaimed sandbox).
    let inst = with_hold(DAEMON);
    let (mut child, rx, stamp) = held(&inst);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = outcome_of(&rx, &mut child);
    assert_eq!(out.reason, EndReason::Stopped, "{out:?}");
    assert!(out.error.is_none() && out.leftovers.is_empty(), "{out:?}");
    assert!(!running(&stamp), "the held child is gone");
    assert!(out.stderr_tail.is_empty(), "the daemon never ran: {out:?}");
    assert_gone(&inst);

    // Abandoned (the agent died): its lifeline ends.
    let inst = with_hold(DAEMON);
    let (mut child, rx, stamp) = held(&inst);
    drop(child.stdin.take());
    let out = outcome_of(&rx, &mut child);
    assert_eq!(out.reason, EndReason::ParentGone, "{out:?}");
    assert!(!running(&stamp));
    assert!(out.stderr_tail.is_empty(), "the daemon never ran: {out:?}");
    assert_gone(&inst);
}

#[test]
fn a_sandbox_whose_child_fails_its_setup_is_never_held() {
    let mut inst = with_hold(DAEMON);
    // Longer than the kernel's 64 bytes: sethostname fails in the child.
    inst.spec.hostname = "h".repeat(100);
    inst.spec.store().unwrap();
    let mut child = spawn(&inst);
    let rx = lines(child.stdout.take().unwrap());
    let first = rx.recv_timeout(WAIT).expect("the shim's outcome");
    assert_ne!(first, HELD_LINE, "a sandbox that could not be set up is not held");
    child.wait().unwrap();
    let out: Outcome = serde_json::from_str(&first).unwrap();
    assert_eq!(out.reason, EndReason::StartFailed, "{out:?}");
    let err = out.error.clone().unwrap_or_default();
    assert!(err.contains("sethostname") && err.contains("EINVAL"), "{out:?}");
    assert!(out.leftovers.is_empty(), "{out:?}");
    assert_gone(&inst);
}

#[test]
fn a_go_on_a_socket_lifeline_hands_the_daemon_a_listener_as_fd_3() {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    // What the daemon got: its activation variables, the extra args ($0 and
    // $1 of `sh -c`) and what its fd 3 is.
    let script = r#"echo "$LISTEN_FDS $LISTEN_PID $0 $1" > got.tmp; readlink /proc/self/fd/3 >> got.tmp; mv got.tmp got; exec sleep 1000"#;
    let mut inst = with_hold(script);
    inst.spec.hold_fd_args = vec!["--addr".into(), "fd://".into()];
    inst.spec.store().unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut child = std::process::Command::new(SHIM)
        .arg("run")
        .arg(&inst.dir)
        .stdin(std::process::Stdio::from(OwnedFd::from(theirs)))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(child.stdout.take().unwrap());
    assert_eq!(rx.recv_timeout(WAIT).expect("held"), HELD_LINE);
    let sock = inst._tmp.path().join("pod.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let ino = fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap().ino();
    let fds = [listener.as_raw_fd()];
    let sent = sendmsg::<()>(
        ours.as_raw_fd(),
        &[std::io::IoSlice::new(&[GO_BYTE])],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    );
    assert_eq!(sent, Ok(1));
    let got = read_when_there(&inst.dir.join("root/got"));
    let mut lines_got = got.lines();
    assert_eq!(lines_got.next(), Some("1 1 --addr fd://"), "{got}");
    assert_eq!(lines_got.next().map(String::from), Some(format!("socket:[{ino}]")), "{got}");
    // The shim keeps no copy of the listener: only the test and the daemon.
    let shim_fds: Vec<String> = fs::read_dir(format!("/proc/{}/fd", child.id()))
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(!shim_fds.contains(&format!("socket:[{ino}]")), "{shim_fds:?}");
    drop(ours);
    let out = outcome_of(&rx, &mut child);
    assert_eq!(out.reason, EndReason::ParentGone, "{out:?}");
    assert!(out.leftovers.is_empty(), "{out:?}");
    assert_gone(&inst);
}

/// The shim's own path, as /proc/<pid>/exe shows it.
static SHIM_PATH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| fs::canonicalize(SHIM).unwrap().display().to_string());
