//! fakekitd's sd_notify, as buildkitd does it (go-systemd's
//! `daemon.SdNotify`): when `NOTIFY_SOCKET` is set, one datagram `READY=1`
//! once the listeners are bound, just before serving, and `STOPPING=1` on
//! shutdown. Errors are reported on stderr and otherwise ignored, as
//! buildkitd logs them at debug level and goes on.

use std::os::unix::net::UnixDatagram;

/// Sends `state` to `$NOTIFY_SOCKET`; false when it is unset.
pub fn send(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
        return false;
    };
    let sent = UnixDatagram::unbound().and_then(|s| s.send_to(state.as_bytes(), &path));
    match sent {
        Ok(_) => {
            eprintln!("fakekitd: notified {state} on {}", path.to_string_lossy());
            true
        }
        Err(e) => {
            eprintln!("fakekitd: notify {state} on {}: {e}", path.to_string_lossy());
            false
        }
    }
}
