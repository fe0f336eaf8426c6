//! The agent's handle on one running `berth-shim run`: its pid, its
//! lifeline (stdin: dropping it tells the shim the agent is gone; a warm
//! sandbox's is a unix socket, and its go one byte on it), and its report (one JSON `Outcome` line
//! on stdout, after the `held` line of a sandbox). Spawn creates it,
//! readiness and reap wait on it and ask it to stop.

use crate::sys;
use crate::Ctx;
use berth_shim::spec::Outcome;
use nix::sys::signal::Signal;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::oneshot;
use tracing::{error, warn};

/// How long past its stop grace a shim may take to wipe before the agent
/// falls back to `berth-shim delete`.
const WIPE_BUDGET: Duration = Duration::from_secs(60);

/// The agent's end of a shim's stdin. Dropping it tells the shim the agent
/// is gone. A sandbox's is a unix socket, whose go may carry a pod's
/// listener; others' a pipe.
pub enum Lifeline {
    Pipe(Option<ChildStdin>),
    Socket(std::os::unix::net::UnixStream),
}

/// A running shim: its pid, its lifeline (stdin: dropping it tells the shim
/// the agent is gone), and its report, read from stdout by a task.
pub struct Shim {
    pid: Option<u32>,
    id: String,
    dir: PathBuf,
    lifeline: Lifeline,
    done: Option<oneshot::Receiver<Option<Outcome>>>,
    outcome: Option<Option<Outcome>>,
    /// A sandbox's `held` line (`berth_shim::spec::HELD_LINE`).
    held: Option<oneshot::Receiver<()>>,
    /// The agent's end of the daemon's NOTIFY_SOCKET until it is ready
    /// (notify.rs); taken by `spawn::wait_ready`.
    pub notify: Option<crate::notify::Notify>,
    /// How long the agent's part of the start took, step by step
    /// (`berth_shim::steps`), for the `instance ready` line.
    pub start_steps: String,
}

impl Shim {
    /// `socket`: the agent's end of a sandbox's lifeline (its stdin); None:
    /// the child's piped stdin is the lifeline.
    pub fn new(
        mut child: Child,
        id: String,
        dir: PathBuf,
        socket: Option<std::os::unix::net::UnixStream>,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Shim {
        let lifeline = match socket {
            Some(s) => Lifeline::Socket(s),
            None => Lifeline::Pipe(child.stdin.take()),
        };
        let stdout = child.stdout.take();
        let pid = child.id();
        let (tx, rx) = oneshot::channel();
        let (held_tx, held_rx) = oneshot::channel();
        let tag = id.clone();
        // Tracked, so the agent exits only after its shims have: an agent
        // that is pid 1 of its pid namespace (a pod without hostPID) would
        // otherwise take shims still emptying the trash down with it.
        tasks.spawn(async move {
            // The outcome is handed on as soon as its line arrives: the shim
            // then still empties the instance's trash entry before it exits,
            // and the slot need not wait for that.
            let mut tx = Some(tx);
            let mut held_tx = Some(held_tx);
            if let Some(out) = stdout {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line == berth_shim::spec::HELD_LINE {
                        if let Some(h) = held_tx.take() {
                            let _ = h.send(());
                        }
                        continue;
                    }
                    match serde_json::from_str::<Outcome>(&line) {
                        Ok(o) => {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(Some(o));
                            }
                        }
                        Err(e) => warn!(instance = %tag, line, error = %e, "unreadable line from shim"),
                    }
                }
            }
            let status = child.wait().await;
            if let Some(tx) = tx.take() {
                error!(instance = %tag, ?status, "shim ended without an outcome");
                let _ = tx.send(None);
            } else if !status.as_ref().is_ok_and(|s| s.success()) {
                warn!(instance = %tag, ?status, "shim exited with an error after its outcome (see its log)");
            }
        });
        Shim {
            pid,
            id,
            dir,
            lifeline,
            done: Some(rx),
            outcome: None,
            held: Some(held_rx),
            notify: None,
            start_steps: String::new(),
        }
    }

    /// Resolves when the shim has ended; cancel-safe, so it can sit in a
    /// `select!` loop. Later calls return the same outcome at once.
    pub async fn ended(&mut self) -> Option<Outcome> {
        if let Some(o) = &self.outcome {
            return o.clone();
        }
        let o = match self.done.as_mut() {
            Some(rx) => rx.await.unwrap_or(None),
            None => None,
        };
        self.done = None;
        self.outcome = Some(o.clone());
        o
    }

    /// Resolves `Ok` when a sandbox's shim says it holds (`Spec::hold`);
    /// `Err` if the shim's report ended without the line. Taken once.
    pub fn take_held(&mut self) -> Option<oneshot::Receiver<()>> {
        self.held.take()
    }

    /// Tells a held sandbox's shim to exec the daemon: one byte on its
    /// lifeline, carrying the pod's listener when a pod's socket claimed
    /// it. A one-byte send on an empty socket does not block.
    pub fn go(&mut self, listener: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let Lifeline::Socket(line) = &self.lifeline else {
            return Err(std::io::Error::other("the shim's lifeline is a pipe, not a sandbox's socket"));
        };
        let fds: Vec<_> = listener.iter().map(|l| l.as_raw_fd()).collect();
        let cmsg: Vec<_> = listener.iter().map(|_| ControlMessage::ScmRights(&fds)).collect();
        let byte = [berth_shim::spec::GO_BYTE];
        sendmsg::<()>(line.as_raw_fd(), &[std::io::IoSlice::new(&byte)], &cmsg, MsgFlags::MSG_NOSIGNAL, None)
            .map(drop)
            .map_err(std::io::Error::from)
    }

    /// Asks the shim to tear down and waits for its outcome. A shim that does
    /// not finish in time is killed and the instance deleted from its files.
    pub async fn stop(&mut self, ctx: &Ctx) -> Option<Outcome> {
        if self.outcome.is_none() {
            if let Some(pid) = self.pid {
                if let Err(e) = sys::signal(pid, Signal::SIGTERM) {
                    warn!(error = %e, "could not signal the shim");
                }
            }
        }
        let budget = ctx.run.stop_grace + WIPE_BUDGET;
        match tokio::time::timeout(budget, self.ended()).await {
            Ok(o) if o.is_some() => o,
            res => {
                if res.is_err() {
                    error!(pid = ?self.pid, "shim did not finish its wipe in {budget:?}; killing it and deleting from files");
                    if let Some(pid) = self.pid {
                        let _ = sys::signal(pid, Signal::SIGKILL);
                    }
                }
                crate::recover::delete(ctx, &self.dir).await.or_else(|| {
                    error!(instance = %self.id, "delete of instance failed");
                    None
                })
            }
        }
    }
}

/// "daemon exited with status 1" / "killed by signal 9 (OOM)" etc.
pub fn describe_exit(o: &Outcome) -> String {
    let mut s = match (o.exit_code, o.signal, &o.error) {
        (_, _, Some(err)) => format!("shim error: {err}"),
        (Some(code), _, _) => format!("the daemon exited with status {code}"),
        (_, Some(sig), _) => format!("the daemon was killed by signal {sig}"),
        _ => "the daemon ended".to_string(),
    };
    if o.oom_kills > 0 {
        s.push_str(" after hitting the memory limit (OOM kill)");
    }
    s
}
