//! `--addr fd://` as buildkitd serves it (cmd/buildkitd/main.go `listenFD`,
//! go-systemd's `activation.Listeners`): the listeners are the descriptors
//! from 3 on, `LISTEN_FDS` of them, and only when `LISTEN_PID` is this
//! process's pid; the variables are unset once read, the descriptors made
//! close-on-exec. Only the first is served (`fd://` with no number), as
//! buildkitd does; `fd://<n>` is refused with buildkitd's words.

use tokio::net::UnixListener;

/// The first socket-activation descriptor, as a listener.
pub fn listener(addr: &str) -> Result<UnixListener, String> {
    if addr != "fd://" {
        return Err(format!("--addr {addr:?}: not supported yet (only fd:// takes the first activation socket)"));
    }
    let pid = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok());
    let n = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
    // Unset whether or not they were ours (activation.Files(true)); the
    // process is still single-threaded here.
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    if pid != Some(std::process::id()) || n == 0 {
        return Err(format!(
            "no sockets found via socket activation: make sure the service was started by systemd (LISTEN_PID={pid:?}, own pid {}, LISTEN_FDS={n})",
            std::process::id()
        ));
    }
    let fd = berth_shim::sys::inherited_listener(3)
        .map_err(|e| format!("fd 3 from socket activation is not a listening socket: {e}"))?;
    let l = std::os::unix::net::UnixListener::from(fd);
    l.set_nonblocking(true).map_err(|e| format!("fd 3: {e}"))?;
    UnixListener::from_std(l).map_err(|e| format!("fd 3: {e}"))
}
