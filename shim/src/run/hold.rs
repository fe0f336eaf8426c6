//! A sandbox of the warm pool (`--warm-stage sandbox`, `Spec::hold`): the
//! shim has made the whole instance (namespaces, maps, cgroup, network,
//! disk) and its child waits before exec on the handshake pipe. The shim
//! says so with one line on its stdout ([`HELD_LINE`], before the outcome
//! line) and waits for the agent's [`GO_BYTE`] on its lifeline.
//!
//! The child is set up before the shim says `held` (`set_up`): root of its
//! user namespace, its hostname, loopback, mounts and /proc in place, so a
//! claim leaves it only the exec. It runs nothing but berth-shim's own code
//! until then, and nothing the daemon could leave behind exists yet. Its end
//! while held is the same as a failed start's: the shim drops the
//! handshake pipe (the child reads EOF and exits) and wipes.

use super::supervise::{self, End};
use super::RunError;
use crate::spec::{EndReason, GO_BYTE, HELD_LINE};
use crate::{sys, teardown};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::{read, write, Pid};
use std::io::Write as _;
use std::os::fd::{AsFd, OwnedFd};

/// Lets the held child set itself up (credentials, hostname, loopback,
/// mounts, /proc, its stdio: all of `child::setup`) before the sandbox is
/// said to be held, so that a claim leaves it only the exec: the first
/// handshake byte, then the child's answer on the same socket. A child that
/// fails its setup exits; its report comes from the error pipe.
pub(super) fn set_up(id: &str, pid: Pid, sync: &OwnedFd, err_r: &OwnedFd) -> Result<(), RunError> {
    let child = |what, errno| RunError::Child { pid, what, errno };
    loop {
        match write(sync, &[1]) {
            Ok(1) => break,
            Err(Errno::EINTR) => continue,
            Ok(_) => return Err(child("sandbox handshake write", Errno::EIO)),
            Err(errno) => return Err(child("sandbox handshake write", errno)),
        }
    }
    let mut byte = [0u8; 1];
    loop {
        match read(sync, &mut byte) {
            Ok(1) => return Ok(()),
            Err(Errno::EINTR) => continue,
            // EOF: the child is gone; its step and errno are on the error
            // pipe (whose last writer it was, so the read ends).
            _ => {
                let mut msg = Vec::new();
                supervise::drain(err_r.as_fd(), &mut msg);
                let why = supervise::setup_error(&msg).unwrap_or_default();
                crate::log!(id, "the held child pid {pid} failed its setup: {why}");
                return Err(RunError::SandboxSetup { pid, why });
            }
        }
    }
}

/// Says the sandbox is made and waits: `Ok` on the agent's go, with the
/// pod's listener it may carry; the end otherwise (stopped, the agent gone,
/// or the child dead before exec).
pub(super) fn wait(id: &str, sigfd: &SignalFd, pid: Pid) -> Result<Option<OwnedFd>, End> {
    let end = |reason, status, error: Option<String>| Err(End { reason, status, error });
    {
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{HELD_LINE}").and_then(|()| out.flush()) {
            // Nobody reads the report: the agent is gone.
            crate::log!(id, "could not say the sandbox is held ({e}): treating the agent as gone");
            return end(EndReason::ParentGone, None, None);
        }
    }
    crate::log!(id, "sandbox held: child pid {pid} waits before exec for the agent's go");
    let stdin = std::io::stdin();
    loop {
        let mut fds = [PollFd::new(sigfd.as_fd(), PollFlags::POLLIN), PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => return end(EndReason::Stopped, None, Some(format!("poll while held: {errno}"))),
        }
        let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
        let (sig_ready, stdin_ready) = (ready(0), ready(1));
        if sig_ready {
            while let Ok(Some(info)) = sigfd.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGCHLD) => {
                        if let Some(st) = teardown::reap(Some(pid)) {
                            crate::log!(id, "the held child pid {pid} ended before exec: {st:?}");
                            let why = format!("the sandbox's child ended before exec: {st:?}");
                            return end(EndReason::StartFailed, Some(st), Some(why));
                        }
                    }
                    Ok(s @ (Signal::SIGTERM | Signal::SIGINT)) => {
                        crate::log!(id, "{s}: stopping the held sandbox (its daemon never ran)");
                        return end(EndReason::Stopped, None, None);
                    }
                    Ok(s) => crate::log!(id, "{s}: ignored while held"),
                    Err(_) => {}
                }
            }
        }
        if stdin_ready {
            // One byte at a time: nothing after the go is this wait's. The
            // agent's lifeline is a unix socket, whose go may carry a pod's
            // listener; a pipe (a hand-run shim) carries bytes only.
            let got = match sys::recv_byte_and_fd(stdin.as_fd()) {
                Err(Errno::ENOTSOCK) => {
                    let mut byte = [0u8; 1];
                    read(stdin.as_fd(), &mut byte).map(|n| (n, byte[0], None))
                }
                r => r,
            };
            match got {
                Ok((1, GO_BYTE, listener)) => {
                    if let Some(l) = &listener {
                        if !matches!(getsockopt(l, sockopt::AcceptConn), Ok(true)) {
                            let why = "the go carried a descriptor that is not a listening socket".to_string();
                            crate::log!(id, "{why}");
                            return end(EndReason::StartFailed, None, Some(why));
                        }
                    }
                    return Ok(listener);
                }
                Ok((0, _, _)) => {
                    crate::log!(id, "lifeline closed while held: the agent is gone");
                    return end(EndReason::ParentGone, None, None);
                }
                Ok((_, byte, _)) => crate::log!(id, "unexpected byte {byte:#04x} on the lifeline while held: ignored"),
                Err(Errno::EINTR) | Err(Errno::EAGAIN) => {}
                Err(errno) => {
                    crate::log!(id, "lifeline unreadable while held ({errno}): treating the agent as gone");
                    return end(EndReason::ParentGone, None, None);
                }
            }
        }
    }
}
