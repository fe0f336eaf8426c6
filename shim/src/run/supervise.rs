//! The shim's main loop while the daemon runs: one poll(2) over a signalfd
//! (SIGCHLD, SIGTERM, SIGINT, SIGHUP), the agent's lifeline on stdin, the
//! child's exec-error pipe until exec has happened, and the daemon's output
//! pipe until its EOF.

use super::output::Output;
use crate::spec::EndReason;
use crate::teardown;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::WaitStatus;
use nix::unistd::{read, Pid};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Why supervision ended.
pub(super) struct End {
    pub reason: EndReason,
    /// The daemon's exit, when it is already reaped.
    pub status: Option<WaitStatus>,
    /// The child's setup or exec error, or a failure of the loop itself.
    pub error: Option<String>,
}

/// Reads what the child wrote to the error pipe; true at EOF.
pub(super) fn drain(fd: BorrowedFd, msg: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match read(fd, &mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                msg.extend_from_slice(&buf[..n]);
                // One report is all a child writes; stop before a huge one.
                if msg.len() > 4096 {
                    return true;
                }
            }
            Err(Errno::EINTR) => {}
            // Not readable yet (poll said so, but be safe): not EOF either.
            Err(_) => return false,
        }
    }
}

pub(super) fn setup_error(msg: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(msg).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Runs until the daemon exits, the shim is told to stop, or the agent is
/// gone.
pub(super) fn watch(id: &str, sigfd: &SignalFd, pid: Pid, err_r: &OwnedFd, output: &mut Output) -> End {
    let stdin = std::io::stdin();
    let mut exec_pending = true;
    let mut msg = Vec::new();
    let end = |reason, status, msg: &[u8]| End { reason, status, error: setup_error(msg) };
    loop {
        let mut fds =
            vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN), PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        let mut add = |fd| {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
            fds.len() - 1
        };
        let err_at = exec_pending.then(|| add(err_r.as_fd()));
        let out_at = output.fd().map(add);
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => {
                return End { reason: EndReason::Stopped, status: None, error: Some(format!("poll: {errno}")) };
            }
        }
        let ready = |i: Option<usize>| i.and_then(|i| fds[i].revents()).is_some_and(|r| !r.is_empty());
        let (sig_ready, stdin_ready, err_ready, out_ready) =
            (ready(Some(0)), ready(Some(1)), ready(err_at), ready(out_at));
        drop(fds);

        // First, so the daemon is never kept waiting on a full pipe (EOF or
        // not, the rest is drained at the teardown).
        if out_ready {
            output.pump();
        }
        if err_ready && drain(err_r.as_fd(), &mut msg) {
            exec_pending = false;
            match setup_error(&msg) {
                None => crate::log!(id, "daemon pid {pid} exec'd"),
                Some(e) => crate::log!(id, "daemon pid {pid} failed to start: {e}"),
            }
        }
        if sig_ready {
            while let Ok(Some(info)) = sigfd.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGCHLD) => {
                        if let Some(st) = teardown::reap(Some(pid)) {
                            crate::log!(id, "daemon pid {pid} ended: {st:?}");
                            // Dead child, closed pipe: the read cannot block.
                            if exec_pending {
                                drain(err_r.as_fd(), &mut msg);
                            }
                            let reason = match setup_error(&msg) {
                                Some(_) => EndReason::StartFailed,
                                None => EndReason::DaemonExited,
                            };
                            return end(reason, Some(st), &msg);
                        }
                    }
                    Ok(s @ (Signal::SIGTERM | Signal::SIGINT)) => {
                        crate::log!(id, "{s}: stopping");
                        return end(EndReason::Stopped, None, &msg);
                    }
                    Ok(s) => crate::log!(id, "{s}: ignored (the lifeline on stdin tells the agent's end)"),
                    Err(_) => {}
                }
            }
        }
        if stdin_ready {
            let mut buf = [0u8; 256];
            match read(stdin.as_fd(), &mut buf) {
                Ok(0) => {
                    crate::log!(id, "lifeline closed: the agent is gone");
                    return end(EndReason::ParentGone, None, &msg);
                }
                // Bytes on the lifeline carry no meaning (yet).
                Ok(_) | Err(Errno::EINTR) | Err(Errno::EAGAIN) => {}
                Err(errno) => {
                    crate::log!(id, "lifeline unreadable ({errno}): treating the agent as gone");
                    return end(EndReason::ParentGone, None, &msg);
                }
            }
        }
    }
}
