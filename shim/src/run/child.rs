//! The cloned child's side of `run`: wait for the parent's handshake, become
//! root of the new user namespace, set up what the daemon's namespaces need,
//! and exec the daemon.
//!
//! Everything the child needs is prepared by the parent before clone
//! (C strings, open fds), and the child writes its errors from a stack
//! buffer: it allocates nothing on the heap. That matters less here than
//! after a fork in a threaded program (the shim is single-threaded, so no
//! lock can be held), but it keeps the child's path short and predictable.

use super::RunError;
use crate::spec::{self, Spec};
use crate::sys;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::sys::socket::{send, MsgFlags};
use nix::unistd::{
    chdir, dup2_stderr, dup2_stdin, dup2_stdout, execve, read, setgroups, sethostname, setresgid, setresuid, write,
    Gid, Uid,
};
use std::ffi::CString;
use std::io::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// Exit status of the child when its setup failed before exec.
pub const EXIT_SETUP: i32 = 126;
/// Exit status of the child when execve failed (as a shell reports it).
pub const EXIT_EXEC: i32 = 127;

/// What the child needs, built in the parent before clone.
pub(super) struct Plan<'a> {
    pub daemon: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub hostname: String,
    /// The daemon has its own network namespace: bring its loopback up.
    pub loopback: bool,
    pub root: CString,
    /// `(source, target)` files bind-mounted in the daemon's mount namespace:
    /// the instance's own resolv.conf and hosts (isolated network).
    pub binds: Vec<(CString, CString)>,
    /// Read end of the handshake pipe: one byte = maps written, go on.
    pub sync_r: BorrowedFd<'a>,
    /// Write end of the error pipe: closed by exec (CLOEXEC) on success,
    /// carries the failing step otherwise.
    pub err_w: BorrowedFd<'a>,
    /// Write end of the output pipe the shim copies to daemon.log, becomes
    /// stdout and stderr.
    pub out: BorrowedFd<'a>,
    /// /dev/null, becomes stdin.
    pub null: BorrowedFd<'a>,
    /// fd-passed (issue 15): the pod's listening socket, which becomes the
    /// daemon's fd 3 without close-on-exec (socket activation).
    pub listener: Option<BorrowedFd<'a>>,
    /// A held sandbox (`Spec::hold`): the handshake is a unix socket whose
    /// byte may carry a pod's listener; with one, the daemon execs with
    /// these argv and envp (`Spec::hold_fd_args`, `LISTEN_*`).
    pub with_listener: Option<(Vec<CString>, Vec<CString>)>,
    /// The parent's ends of the three pipes, which the child must close: the
    /// handshake's write end above all, or the child never sees EOF.
    pub close: [RawFd; 3],
}

fn cstr(field: &'static str, s: &[u8]) -> Result<CString, RunError> {
    CString::new(s).map_err(|_| RunError::Nul { field, value: String::from_utf8_lossy(s).into_owned() })
}

impl<'a> Plan<'a> {
    pub fn new(spec: &Spec, fds: [BorrowedFd<'a>; 4], close: [RawFd; 3]) -> Result<Plan<'a>, RunError> {
        let daemon = cstr("daemon", spec.daemon.as_os_str().as_bytes())?;
        let mut argv = vec![daemon.clone()];
        for a in &spec.args {
            argv.push(cstr("args", a.as_bytes())?);
        }
        let mut envp = Vec::new();
        for (k, v) in &spec.env {
            if k.is_empty() || k.contains('=') {
                return Err(RunError::Nul { field: "env (bad name)", value: k.clone() });
            }
            envp.push(cstr("env", format!("{k}={v}").as_bytes())?);
        }
        // go-systemd's activation (buildkitd's `--addr fd://`) takes the
        // fds only when LISTEN_PID is its own pid: the daemon is pid 1 of the
        // new pid namespace (exec keeps the clone's pid).
        let activation = |envp: &mut Vec<CString>| -> Result<(), RunError> {
            for kv in [&b"LISTEN_PID=1"[..], b"LISTEN_FDS=1", b"LISTEN_FDNAMES=berth-pod"] {
                envp.push(cstr("env", kv)?);
            }
            Ok(())
        };
        let with_listener = match spec.hold {
            true => {
                let mut argv = argv.clone();
                for a in &spec.hold_fd_args {
                    argv.push(cstr("hold_fd_args", a.as_bytes())?);
                }
                let mut envp = envp.clone();
                activation(&mut envp)?;
                Some((argv, envp))
            }
            false => None,
        };
        if spec.listen_fd {
            activation(&mut envp)?;
        }
        let root = cstr("dir", spec.root_dir().as_os_str().as_bytes())?;
        let mut binds = Vec::new();
        if spec.network.is_some() {
            for (file, target) in [(spec::RESOLV_FILE, "/etc/resolv.conf"), (spec::HOSTS_FILE, "/etc/hosts")] {
                let src = cstr("dir", spec.dir.join(file).as_os_str().as_bytes())?;
                binds.push((src, cstr("dir", target.as_bytes())?));
            }
        }
        let [sync_r, err_w, out, null] = fds;
        Ok(Plan {
            daemon,
            argv,
            envp,
            hostname: spec.hostname.clone(),
            loopback: spec.isolate_network || spec.network.is_some(),
            root,
            binds,
            sync_r,
            err_w,
            out,
            null,
            listener: None,
            with_listener,
            close,
        })
    }
}

/// The child's whole life; returns only through `_exit` or exec.
pub(super) fn main(plan: &Plan) -> isize {
    for fd in plan.close {
        sys::close_in_child(fd);
    }
    // EOF without the byte: the parent failed a step (or died) and reports
    // it; nothing to add.
    let mut byte = [0u8; 1];
    loop {
        match read(plan.sync_r, &mut byte) {
            Ok(1) => break,
            Err(Errno::EINTR) => continue,
            _ => sys::exit_now(1),
        }
    }
    if let Err((step, errno)) = setup(plan) {
        report(plan, &[b"berth-shim: ", step.as_bytes()], errno);
        sys::exit_now(EXIT_SETUP);
    }
    sys::reset_signals();
    // A held sandbox: set up, it says so on the handshake socket and waits
    // for the go, whose byte may carry a pod's listener. Only the exec is
    // left for the claim.
    let mut handed = false;
    if plan.with_listener.is_some() {
        loop {
            match send(plan.sync_r.as_raw_fd(), &[1], MsgFlags::MSG_NOSIGNAL) {
                Ok(1) => break,
                Err(Errno::EINTR) => continue,
                _ => sys::exit_now(1),
            }
        }
        let listener = loop {
            match sys::recv_byte_and_fd(plan.sync_r) {
                Ok((1, _, fd)) => break fd,
                Err(Errno::EINTR) => continue,
                _ => sys::exit_now(1),
            }
        };
        if let Some(l) = listener {
            if let Err((step, errno)) = place_listener(plan, l) {
                report(plan, &[b"berth-shim: ", step.as_bytes()], errno);
                sys::exit_now(EXIT_SETUP);
            }
            handed = true;
        }
    }
    let (argv, envp) = match (&plan.with_listener, handed) {
        (Some((argv, envp)), true) => (argv, envp),
        _ => (&plan.argv, &plan.envp),
    };
    let Err(errno) = execve(&plan.daemon, argv, envp);
    report(plan, &[b"berth-shim: exec ", plan.daemon.as_bytes()], errno);
    sys::exit_now(EXIT_EXEC)
}

/// A pod's listener sent with a held sandbox's go: fd 3 of the daemon. The
/// number is the shim's signalfd's in this copy of its table (the shim's
/// first descriptor), never one the child uses.
fn place_listener(plan: &Plan, l: OwnedFd) -> Result<(), Step> {
    let own = [plan.sync_r.as_raw_fd(), plan.err_w.as_raw_fd(), plan.out.as_raw_fd(), plan.null.as_raw_fd()];
    if own.contains(&spec::LISTEN_FD) {
        return Err(("fd 3 is one of the child's own descriptors; cannot place the pod's listener", Errno::EBUSY));
    }
    sys::place_in_child(l, spec::LISTEN_FD).map_err(at("place the pod's listener at fd 3"))
}

type Step = (&'static str, Errno);

fn at(step: &'static str) -> impl FnOnce(Errno) -> Step {
    move |e| (step, e)
}

fn setup(plan: &Plan) -> Result<(), Step> {
    // Root of the new user namespace: the parent mapped 0 to host_base.
    // setgroups is allowed because a privileged parent wrote gid_map.
    setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)).map_err(at("setresgid"))?;
    setgroups(&[]).map_err(at("setgroups"))?;
    setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).map_err(at("setresuid"))?;
    // Only now: changing credentials clears the parent-death signal.
    prctl::set_pdeathsig(Signal::SIGKILL).map_err(at("prctl(PR_SET_PDEATHSIG)"))?;
    // getppid() is 0 in a new pid namespace, so it cannot tell whether the
    // shim died before the line above. The shim holds the handshake pipe's
    // write end for as long as it lives: a hangup there means it is gone.
    let mut pfd = [PollFd::new(plan.sync_r, PollFlags::POLLIN)];
    poll(&mut pfd, PollTimeout::ZERO).map_err(at("poll(handshake)"))?;
    if pfd[0].revents().is_some_and(|r| r.contains(PollFlags::POLLHUP)) {
        return Err(("the shim exited during setup", Errno::ESRCH));
    }
    sethostname(&plan.hostname).map_err(at("sethostname"))?;
    if plan.loopback {
        // A new network namespace starts with lo down; build steps that
        // talk to localhost need it up.
        sys::loopback_up().map_err(at("bring up lo in the new network namespace"))?;
    }
    // Nothing mounted from here on may propagate back to the host.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(at("mount --make-rprivate /"))?;
    // The build resolves names as its namespace can: the agent's resolvers,
    // never a loopback one (which would be the instance's own loopback).
    for (src, target) in &plan.binds {
        // A host without the file (a minimal image with no /etc/resolv.conf)
        // has nothing to hide from the build: nothing to bind over.
        if nix::sys::stat::lstat(target.as_c_str()).is_err() {
            continue;
        }
        mount(Some(src.as_c_str()), target.as_c_str(), None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(at("bind-mount the instance's resolv.conf/hosts over /etc"))?;
    }
    // pid 1 of a new pid namespace: the inherited /proc shows the host's
    // pids; a fresh one shows the namespace's.
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), flags, None::<&str>).map_err(at("mount proc on /proc"))?;
    dup2_stdin(plan.null).map_err(at("dup2 /dev/null to stdin"))?;
    dup2_stdout(plan.out).map_err(at("dup2 the output pipe to stdout"))?;
    dup2_stderr(plan.out).map_err(at("dup2 the output pipe to stderr"))?;
    chdir(plan.root.as_c_str()).map_err(at("chdir to the root dir"))?;
    // The shim's lifeline (fd 0) and outcome pipe (fd 1) were replaced
    // above; anything else it holds must not reach the daemon either.
    sys::cloexec_from(3).map_err(at("close_range"))?;
    if let Some(l) = plan.listener {
        // The shim took it as its own fd 3 (`sys::inherited_listener`), so
        // it is already the daemon's fd 3: only keep it across exec.
        if l.as_raw_fd() != spec::LISTEN_FD {
            return Err(("the pod's listener is not fd 3", Errno::EBADF));
        }
        fcntl(l, FcntlArg::F_SETFD(FdFlag::empty())).map_err(at("keep the pod's listener (fd 3) across exec"))?;
    }
    Ok(())
}

/// Writes `<parts>: <ERRNO>: <description>` to the output pipe (daemon.log)
/// and to the error pipe, from a stack buffer.
fn report(plan: &Plan, parts: &[&[u8]], errno: Errno) {
    let mut buf = [0u8; 1024];
    let len = {
        let mut cur = std::io::Cursor::new(&mut buf[..]);
        for p in parts {
            let _ = cur.write_all(p);
        }
        let _ = writeln!(cur, ": {errno:?}: {}", errno.desc());
        cur.position() as usize
    };
    let _ = write(plan.out, &buf[..len]);
    let _ = write(plan.err_w, &buf[..len]);
}
