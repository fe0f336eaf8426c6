//! Readiness by notification: the daemon's `NOTIFY_SOCKET`.
//!
//! buildkitd (cmd/buildkitd/main.go, via go-systemd's `daemon.SdNotify`)
//! sends one datagram `READY=1` to `$NOTIFY_SOCKET` once its listeners are
//! bound, just before it starts serving on them (connections made from then
//! on wait in the listen backlog), and `STOPPING=1` when it shuts down. The
//! agent binds that socket itself, in the instance dir, before the shim
//! starts: readiness is decided in the agent (`spawn::wait_ready`), so the
//! datagram needs no second hop through the shim's outcome pipe, and the
//! socket's one owner is the one that reads it.
//!
//! Who may send: the socket file is owned by the instance's mapped root and
//! mode 0600 (connecting to a unix socket needs write permission on it), in
//! the instance dir (root's, 0711: the daemon sees it at the same path, as
//! its mount namespace is a private copy of the host's; it cannot replace the
//! file). With SO_PASSCRED the kernel attaches the sender's credentials to
//! every datagram, and a datagram whose uid is not the instance's mapped
//! root is dropped with a warning.
//!
//! The socket is a per-instance resource: acquired here (`bind`), its file
//! released with the instance dir (the shim's wipe, `berth-shim delete`, the
//! sweep), its descriptor dropped as soon as the daemon is ready (the agent
//! holds none for a running instance; a later `STOPPING=1` then fails on the
//! daemon's side, which buildkitd only logs at debug level).

use crate::sys;
use nix::sys::socket::{recvmsg, setsockopt, sockopt::PassCred, ControlMessageOwned, MsgFlags, UnixAddr};
use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use tokio::io::Interest;
use tokio::net::UnixDatagram;
use tracing::{debug, warn};

/// The socket's file name inside the instance dir.
pub const FILE: &str = "notify.sock";
/// The environment variable sd_notify senders read.
pub const ENV: &str = "NOTIFY_SOCKET";
/// Largest datagram read; sd_notify messages are a few short lines.
const MAX_DATAGRAM: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("binding the notify socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("setting up the notify socket {path}: {source}")]
    Setup { path: PathBuf, source: io::Error },
}

impl NotifyError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            NotifyError::Bind { .. } => "notify_bind",
            NotifyError::Setup { .. } => "notify_setup",
        }
    }
}

/// The path of an instance's notify socket.
pub fn path(instance_dir: &Path) -> PathBuf {
    instance_dir.join(FILE)
}

/// The agent's end of one instance's notify socket.
#[derive(Debug)]
pub struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    /// The only sender uid accepted: the instance's mapped root, as the
    /// agent's user namespace sees it.
    uid: u32,
}

/// Binds the notify socket in `instance_dir`, owned by `uid` (the
/// instance's mapped root) and mode 0600, with SO_PASSCRED.
pub fn bind(instance_dir: &Path, uid: u32) -> Result<Notify, NotifyError> {
    let path = path(instance_dir);
    let sock = UnixDatagram::bind(&path).map_err(|source| NotifyError::Bind { path: path.clone(), source })?;
    let setup = |source: io::Error| NotifyError::Setup { path: path.clone(), source };
    sys::chmod(&path, 0o600).map_err(setup)?;
    sys::chown_path(&path, uid, uid).map_err(setup)?;
    setsockopt(&sock, PassCred, &true).map_err(|e| setup(e.into()))?;
    Ok(Notify { sock, path, uid })
}

impl Notify {
    /// Resolves when the instance's root sends a datagram with a `READY=1`
    /// line. Datagrams from anyone else, and other states, are skipped.
    /// Never resolves on a socket error (the probe then decides).
    pub async fn ready(&self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let got = self.sock.async_io(Interest::READABLE, || recv(self.sock.as_raw_fd(), &mut buf)).await;
            let (n, cred) = match got {
                Ok(v) => v,
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "notify socket failed; readiness falls back to the probe");
                    return std::future::pending().await;
                }
            };
            let text = String::from_utf8_lossy(&buf[..n]);
            match cred {
                Some((uid, _)) if uid == self.uid => {}
                other => {
                    warn!(path = %self.path.display(), sender = ?other, want_uid = self.uid, "notify datagram from outside the instance ignored");
                    continue;
                }
            }
            debug!(path = %self.path.display(), message = %text.trim_end(), "daemon notified");
            if is_ready(&text) {
                return;
            }
        }
    }
}

/// One datagram and its sender's (uid, pid), if the kernel attached them.
fn recv(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<(u32, i32)>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let msg = recvmsg::<UnixAddr>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut cred = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmCredentials(u) = c {
            cred = Some((u.uid(), u.pid()));
        }
    }
    Ok((msg.bytes, cred))
}

/// sd_notify's format: newline-separated `KEY=VALUE` assignments.
fn is_ready(text: &str) -> bool {
    text.lines().any(|l| l.trim_end_matches('\0') == "READY=1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram as StdDatagram;

    #[test]
    fn ready_lines() {
        assert!(is_ready("READY=1"));
        assert!(is_ready("STATUS=serving\nREADY=1\n"));
        assert!(!is_ready("STOPPING=1"));
        assert!(!is_ready("READY=0\nXREADY=1"));
    }

    #[tokio::test]
    async fn ready_from_the_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::getuid().as_raw();
        // A socket that accepts only another uid ignores our READY=1.
        let other = bind(dir.path(), me.wrapping_add(1)).unwrap();
        let tx = StdDatagram::unbound().unwrap();
        tx.send_to(b"READY=1", path(dir.path())).unwrap();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(200), other.ready()).await;
        assert!(waited.is_err(), "a foreign sender's READY=1 must not count");
        drop(other);
        std::fs::remove_file(path(dir.path())).unwrap();
        let own = bind(dir.path(), me).unwrap();
        let mode = std::fs::metadata(path(dir.path())).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
        tx.send_to(b"STATUS=starting", path(dir.path())).unwrap();
        tx.send_to(b"READY=1\n", path(dir.path())).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), own.ready()).await.expect("READY=1 from the owner");
    }
}
