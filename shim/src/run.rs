//! `berth-shim run <instance-dir>`: start the daemon in its own namespaces
//! and cgroup, supervise it, and tear everything down at the end.
//!
//! Start is a parent/child handshake, as in runc and youki: the child is
//! cloned into new user, mount, pid, ipc and uts namespaces and blocks on a
//! pipe; the parent (host root) writes its uid/gid maps, moves it into the
//! instance's cgroup and records its pid, then sends one byte. Only then
//! does the child become root of its namespace and exec the daemon, so the
//! daemon never runs unmapped, outside its cgroup, or unrecorded.
//!
//! On cgroup v2 the child is not moved but born in its cgroup (clone3 with
//! CLONE_INTO_CGROUP): a move waits for an RCU grace period, ~5-10 ms of
//! every start on an idle host. The start steps say which way it went:
//! `cgroup.into` (born in it) or `cgroup` (moved, with the time it took).
//!
//! The daemon's stdout and stderr are a pipe the shim copies to daemon.log,
//! up to the spec's cap (see `output`).
//!
//! A sandbox of the warm pool (`Spec::hold`) stops before the handshake
//! byte: everything of the start is made, the child waits before exec, and
//! the agent's go on the lifeline sends the byte (see `hold`).

mod child;
mod hold;
mod output;
mod supervise;

use crate::cgroup::{self, CgroupError};
use crate::spec::{
    CgroupVersion, EndReason, Outcome, PidStamp, Spec, SpecError, DAEMON_LOG_FILE, DAEMON_PID_FILE, SHIM_PID_FILE,
};
use crate::steps::Steps;
use crate::{sys, teardown};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sched::CloneFlags;
use nix::sys::prctl;
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::unistd::{pipe2, write, Pid};
use output::Output;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use child::{EXIT_EXEC, EXIT_SETUP};

/// The daemon's namespaces. A network namespace only with
/// `Spec::isolate_network`: the daemon serves on a unix socket in `run/`,
/// and builds usually need the node's network to fetch anything.
pub const NS_FLAGS: CloneFlags = CloneFlags::CLONE_NEWUSER
    .union(CloneFlags::CLONE_NEWNS)
    .union(CloneFlags::CLONE_NEWPID)
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWUTS);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {errno}")]
    Open { path: PathBuf, errno: Errno },
    #[error("{what}: {errno}")]
    Sys { what: &'static str, errno: Errno },
    #[error("daemon pid {pid}: {what}: {errno}")]
    Child { pid: Pid, what: &'static str, errno: Errno },
    #[error("spec field {field} contains a NUL byte or is malformed: {value:?}")]
    Nul { field: &'static str, value: String },
    #[error("{dir}: spec.json names {spec_dir} as its dir; refusing to run an instance from another dir")]
    WrongDir { dir: PathBuf, spec_dir: PathBuf },
    #[error("{proc}: the shim has {threads} threads, clone needs exactly one")]
    Threads { proc: PathBuf, threads: usize },
    #[error("daemon pid {pid}: the sandbox's setup failed: {why}")]
    SandboxSetup { pid: Pid, why: String },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("isolated network: {0}")]
    Net(#[from] crate::net::NetError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RunError + '_ {
    move |source| RunError::Io { path: path.to_path_buf(), source }
}

/// Bound on reading the output pipe to its EOF once the daemon is reaped
/// (only a write end passed out of its pid namespace outlives it).
pub const OUTPUT_DRAIN_WAIT: Duration = Duration::from_millis(500);

/// A started daemon: its host pid and the parent's pipe ends.
struct Started {
    pid: Pid,
    /// The handshake's write end, held for the shim's whole life: the
    /// child takes a hangup on it as the shim's death (see child::setup).
    sync_w: OwnedFd,
    /// EOF when exec succeeded, the failing step otherwise.
    err_r: OwnedFd,
    /// The daemon's stdout and stderr, copied to daemon.log.
    output: Output,
    /// How long each step of the start took (`crate::steps`).
    steps: Steps,
}

/// Runs the instance in `dir` to its end and returns the outcome to print.
/// Runs the instance to its end. Returns the outcome and the trash entry
/// the instance's dir was moved to, for the caller to empty after it has
/// reported the outcome (see `teardown::finish`).
pub fn run(dir: &Path, proc_root: &Path) -> (Outcome, Option<std::path::PathBuf>) {
    let started = Instant::now();
    let mut steps = Steps::new();
    // First of all, so that a SIGTERM from the agent is never lost or
    // fatal: from here on it waits in the signalfd.
    let sigfd = block_signals();
    // Without a spec that is this dir's own, nothing here is known to be
    // ours to remove: report and leave it all to `delete`.
    let spec = match Spec::load(dir).map_err(RunError::from).and_then(|s| match s.dir == dir {
        true => Ok(s),
        false => Err(RunError::WrongDir { dir: dir.to_path_buf(), spec_dir: s.dir }),
    }) {
        Ok(s) => s,
        Err(e) => {
            let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            crate::log!(id, "{e}");
            let mut out = Outcome::new(&id, EndReason::StartFailed);
            out.error = Some(e.to_string());
            out.leftovers
                .push(format!("{}: not torn down, no usable spec (berth-shim delete cleans it)", dir.display()));
            out.duration_ms = started.elapsed().as_millis() as u64;
            return (out, None);
        }
    };
    let id = spec.id.as_str();
    steps.mark("spec");
    let mut out = Outcome::new(id, EndReason::StartFailed);
    let mut daemon = None;
    let mut grace = Duration::ZERO;
    let mut status = None;
    // Kept until the daemon is gone (see Started::sync_w).
    let mut keep = None;
    match sigfd.and_then(|sigfd| start(&spec, dir, proc_root, &mut daemon, steps).map(|s| (sigfd, s))) {
        Ok((sigfd, mut s)) => {
            // A sandbox of the warm pool waits here, made but not exec'd,
            // until the agent's go (or its end).
            let held = match spec.hold {
                true => {
                    let held = hold::wait(id, &sigfd, s.pid);
                    s.steps.reset();
                    held
                }
                false => Ok(None),
            };
            let released = match held {
                Err(end) => Err(end),
                Ok(listener) => handshake(&mut s, listener).map_err(|e| {
                    crate::log!(id, "start failed: {e}");
                    supervise::End { reason: EndReason::StartFailed, status: None, error: Some(e.to_string()) }
                }),
            };
            let end = match released {
                Ok(()) => {
                    crate::log!(
                        id,
                        "daemon pid {} started: {} (client {}); start steps: {}",
                        s.pid,
                        spec.daemon.display(),
                        spec.client,
                        s.steps.render()
                    );
                    let end = supervise::watch(id, &sigfd, s.pid, &s.err_r, &mut s.output);
                    // A daemon that never got to exec has no handler to run.
                    if end.reason != EndReason::StartFailed {
                        grace = Duration::from_millis(spec.stop_grace_ms);
                    }
                    end
                }
                Err(end) => end,
            };
            out.reason = end.reason;
            out.error = end.error;
            status = end.status;
            keep = Some(s);
        }
        Err(e) => {
            crate::log!(id, "start failed: {e}");
            out.error = Some(e.to_string());
        }
    }
    crate::log!(id, "ending: {:?}", out.reason);
    if let Some(pid) = daemon {
        let mut nap = |d| match keep.as_mut() {
            Some(s) => s.output.wait(d),
            None => std::thread::sleep(d),
        };
        teardown::stop_child(id, pid, grace, status, &mut nap, &mut out);
    }
    // The daemon and its pid namespace are gone: what they wrote is all in
    // the pipe. Past the cap, the file's end is not the output's end.
    let tail = keep.as_mut().and_then(|s| {
        s.output.drain(OUTPUT_DRAIN_WAIT);
        s.output.tail()
    });
    drop(keep);
    let doomed = teardown::finish(id, Some(&spec), dir, proc_root, tail, &mut out);
    out.duration_ms = started.elapsed().as_millis() as u64;
    crate::log!(id, "done in {} ms, {} leftovers", out.duration_ms, out.leftovers.len());
    (out, doomed)
}

/// Blocks the signals the supervisor takes through a signalfd. Blocking
/// happens before clone, so no signal is lost in between; the child
/// unblocks them before exec.
fn block_signals() -> Result<SignalFd, RunError> {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
        .map_err(|errno| RunError::Sys { what: "sigprocmask", errno })?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|errno| RunError::Sys { what: "signalfd", errno })
}

/// The cgroup the daemon is to be born in: an `O_PATH` fd of the instance's
/// cgroup v2 dir for [`sys::clone_into_cgroup`]. `None` on v1, where a
/// process joins one hierarchy per controller and only a move can do that;
/// with the reason when v2's dir cannot be opened (the move then reports
/// the error that matters, with its path).
fn birth_cgroup(spec: &Spec) -> (Option<OwnedFd>, Option<String>) {
    let (CgroupVersion::V2, Some((_, dir))) = (spec.cgroup.version, spec.cgroup.dirs.first()) else {
        return (None, None);
    };
    match open(dir, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()) {
        Ok(fd) => (Some(fd), None),
        Err(errno) => (None, Some(format!("open {}: {errno}", dir.display()))),
    }
}

/// Everything up to the handshake byte (`handshake`). On error, `daemon` holds the
/// child's pid if it was cloned; dropping the pipes makes it `_exit`.
fn start(
    spec: &Spec,
    dir: &Path,
    proc_root: &Path,
    daemon: &mut Option<Pid>,
    mut steps: Steps,
) -> Result<Started, RunError> {
    // fd-passed (issue 15): the pod's listener, inherited from the agent as
    // fd 3; taken first, so the number is ours before anything is opened.
    let listener = match spec.listen_fd {
        true => Some(
            sys::inherited_listener(crate::spec::LISTEN_FD)
                .map_err(|errno| RunError::Sys { what: "fd 3, the pod's listening socket from the agent", errno })?,
        ),
        false => None,
    };
    let me = std::process::id() as i32;
    let shim_pid = dir.join(SHIM_PID_FILE);
    let stamp = PidStamp::of(proc_root, me).map_err(io_at(&proc_root.join(me.to_string())))?;
    fs::write(&shim_pid, stamp.render()).map_err(io_at(&shim_pid))?;

    let (output, out_w) = Output::open(&spec.id, &dir.join(DAEMON_LOG_FILE), spec.log_cap_bytes)?;
    let null = open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|errno| RunError::Open { path: "/dev/null".into(), errno })?;

    // Orphans of the daemon's tree come to us, not to the host's init.
    prctl::set_child_subreaper(true).map_err(|errno| RunError::Sys { what: "prctl(PR_SET_CHILD_SUBREAPER)", errno })?;
    let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|errno| RunError::Sys { what: "pipe2", errno });
    // A held sandbox's handshake may carry a pod's listener (SCM_RIGHTS):
    // a unix socket pair then, a pipe otherwise.
    let (sync_r, sync_w) = match spec.hold {
        true => socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|errno| RunError::Sys { what: "socketpair", errno })?,
        false => pipe()?,
    };
    let (err_r, err_w) = pipe()?;

    steps.mark("setup");
    let threads = sys::thread_count(proc_root).map_err(io_at(&proc_root.join("self/task")))?;
    if threads != 1 {
        return Err(RunError::Threads { proc: proc_root.join("self/task"), threads });
    }
    // cgroup v2: the daemon is born in its cgroup (clone3 with
    // CLONE_INTO_CGROUP), so the move below and its RCU grace period are
    // off the start path. Where the kernel refuses, clone + move as on v1.
    let t = Instant::now();
    let (into, mut refused) = birth_cgroup(spec);
    let opened = t.elapsed();
    steps.reset();
    let (pid, born_in) = {
        let fds = [sync_r.as_fd(), err_w.as_fd(), out_w.as_fd(), null.as_fd()];
        let mut plan = child::Plan::new(spec, fds, [sync_w.as_raw_fd(), err_r.as_raw_fd(), output.raw_fd()])?;
        plan.listener = listener.as_ref().map(|l| l.as_fd());
        let own_netns = spec.isolate_network || spec.network.is_some();
        let flags = if own_netns { NS_FLAGS | CloneFlags::CLONE_NEWNET } else { NS_FLAGS };
        let mut main = || child::main(&plan);
        let born = into.as_ref().and_then(|fd| match sys::clone_into_cgroup(flags, fd.as_fd(), &mut main) {
            Ok(pid) => Some(pid),
            Err(errno) => {
                refused = Some(format!("clone3(CLONE_INTO_CGROUP): {errno}"));
                None
            }
        });
        match born {
            Some(pid) => (pid, true),
            None => {
                let mut stack = vec![0u8; sys::CHILD_STACK];
                let pid = sys::clone_child(flags, &mut stack, &mut main)
                    .map_err(|errno| RunError::Sys { what: "clone", errno })?;
                (pid, false)
            }
        }
    };
    *daemon = Some(pid);
    steps.mark("clone");
    if born_in {
        steps.add("cgroup.into", opened);
    }
    drop(into);
    if let Some(why) = refused {
        crate::log!(
            spec.id,
            "cgroup v2: the daemon could not be born in its cgroup ({why}); moving it in instead, which waits for an RCU grace period on each start unless a cgroup mount has favordynmods (see `berth-agent check`)"
        );
    }
    // The child has its own copies; ours of its ends must go so that EOF
    // and hangups mean what they should.
    // The daemon has its own copy of the pod's listener too.
    drop((sync_r, err_w, out_w, null, listener));

    for file in ["uid_map", "gid_map"] {
        let path = proc_root.join(pid.to_string()).join(file);
        fs::write(&path, spec.ids.map_line()).map_err(io_at(&path))?;
    }
    steps.mark("maps");
    match &spec.network {
        None if born_in => {}
        None => {
            cgroup::join(&spec.cgroup, pid.as_raw())?;
            steps.mark("cgroup");
        }
        // Born in its cgroup: only the veth is left to do.
        Some(net) if born_in => {
            let net_steps = crate::net::setup(net, pid.as_raw(), proc_root)?;
            steps.mark("net");
            steps.nest("net", &net_steps);
        }
        // Isolated network: the veth into the child's new namespace, before
        // the child may exec (see `net`), beside the cgroup join, which can
        // wait ~10 ms for an RCU grace period (v1, or v2 without clone3;
        // docs/benchmarks.md, figure 1): the two touch nothing in common.
        // A thread after clone is fine; only clone needs one thread.
        Some(net) => {
            let (joined, net_steps) = std::thread::scope(|s| {
                let join = s.spawn(|| {
                    let t = Instant::now();
                    (cgroup::join(&spec.cgroup, pid.as_raw()), t.elapsed())
                });
                let net_steps = crate::net::setup(net, pid.as_raw(), proc_root);
                (join.join().expect("the cgroup join does not panic"), net_steps)
            });
            let (joined, took) = joined;
            joined?;
            let net_steps = net_steps?;
            steps.mark("cgroup+net");
            steps.add("cgroup", took);
            steps.nest("net", &net_steps);
            steps.reset();
        }
    }
    let daemon_pid = dir.join(DAEMON_PID_FILE);
    let stamp = PidStamp::of(proc_root, pid.as_raw()).map_err(io_at(&proc_root.join(pid.to_string())))?;
    fs::write(&daemon_pid, stamp.render()).map_err(io_at(&daemon_pid))?;
    if spec.hold {
        hold::set_up(&spec.id, pid, &sync_w, &err_r)?;
        steps.mark("child_setup");
    }
    Ok(Started { pid, sync_w, err_r, output, steps })
}

/// The handshake byte: the child becomes root of its namespace and execs.
/// A held sandbox's wait is not part of its start: the step counts from
/// here.
fn handshake(s: &mut Started, listener: Option<OwnedFd>) -> Result<(), RunError> {
    let pid = s.pid;
    let sent = match &listener {
        // A held sandbox's handshake is a unix socket (see `start`): the
        // pod's listener goes to the child with the byte; the shim's copy
        // is dropped right after, so only the daemon holds it.
        Some(l) => {
            let fds = [l.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(s.sync_w.as_raw_fd(), &[std::io::IoSlice::new(&[1])], &cmsg, MsgFlags::empty(), None)
        }
        None => write(&s.sync_w, &[1]),
    };
    drop(listener);
    match sent {
        Ok(1) => {}
        Ok(_) => return Err(RunError::Child { pid, what: "handshake write", errno: Errno::EIO }),
        Err(errno) => return Err(RunError::Child { pid, what: "handshake write", errno }),
    }
    s.steps.mark("handshake");
    Ok(())
}
