//! How many connections a daemon holds on a pod's listener, asked of the
//! kernel with sock_diag (NETLINK_SOCK_DIAG, `AF_UNIX`), since the agent is
//! no longer in their path.
//!
//! A connection accepted from a unix listener carries the listener's path
//! (the kernel copies it at connect), so `UNIX_DIAG_VFS` reports the
//! listener's socket-file inode for every accepted connection of the pod,
//! and for no other socket. A connection still in the listener's backlog is
//! not in the socket table yet: the listener's own entry (same inode, state
//! LISTEN) counts those (`UNIX_DIAG_RQLEN`). One dump of the unix sockets of
//! the agent's network namespace; the figure for one count at 1, 64 and 1024
//! open connections is in docs/benchmarks.md.
//!
//! The kernel puts an accepted socket in the CONNECTING side's network
//! namespace: a client in a pod with a network namespace of its own has its
//! accepted connections there, out of this dump (its waiting ones are still
//! seen on the listener): [`super::netns`] finds that namespace and counts
//! there too.
//!
//! Hand-written only where the crates stop: netlink-packet-sock-diag keeps
//! `Vfs`'s fields private, so the attribute is read back from its own
//! emitted bytes (`{u32 inode, u32 dev}`, `struct unix_diag_vfs`).

use netlink_packet_core::{Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::unix::nlas::Nla;
use netlink_packet_sock_diag::unix::{ShowFlags, StateFlags, UnixRequest};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A socket file as sock_diag names it: its inode and the kernel's
/// encoding of its filesystem's device (`MKDEV`: major << 20 | minor),
/// which is not the one `stat` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFile {
    pub ino: u32,
    pub dev: u32,
}

impl SocketFile {
    /// The socket file at `path` (a bound listener's).
    pub fn of(path: &Path) -> io::Result<SocketFile> {
        let md = std::fs::symlink_metadata(path)?;
        let dev = md.dev();
        let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
        Ok(SocketFile { ino: md.ino() as u32, dev: ((major << 20) | minor) as u32 })
    }
}

/// Counts the established unix sockets of this network namespace that
/// were connected through the listener bound at `file`: the daemon's
/// accepted connections and those waiting in the listener's backlog.
/// Blocking (one netlink round trip per ~16 KiB of answers).
pub fn count(file: SocketFile) -> io::Result<usize> {
    count_on(&mut socket()?, file)
}

/// A NETLINK_SOCK_DIAG socket. It asks the network namespace the calling
/// thread is in when it is created, for its whole life (see `netns`).
pub fn socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// [`count`] through `socket`, in the namespace it was created in. One dump
/// at a time per socket (the caller holds it mutably).
pub fn count_on(socket: &mut Socket, file: SocketFile) -> io::Result<usize> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let request = UnixRequest {
        state_flags: StateFlags::ESTABLISHED | StateFlags::LISTEN,
        inode: 0,
        show_flags: ShowFlags::VFS | ShowFlags::RQLEN,
        cookie: [0xff; 8],
    };
    let mut packet = NetlinkMessage::new(header, SockDiagMessage::UnixRequest(request).into());
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    socket.send(&buf[..], 0)?;
    let mut n = 0;
    loop {
        let (bytes, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < bytes.len() {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&bytes[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag answer: {e}")))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(r)) => {
                    if r.nlas.iter().any(|nla| matches!(nla, Nla::Vfs(v) if vfs_of(v) == file)) {
                        // The listener: what waits in its backlog (not yet
                        // in the socket table); an accepted one: itself.
                        n += match r.number_of_pending_connection() {
                            Some(pending) => pending as usize,
                            None => 1,
                        };
                    }
                }
                NetlinkPayload::Done(_) => return Ok(n),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

fn vfs_of(v: &netlink_packet_sock_diag::unix::nlas::Vfs) -> SocketFile {
    let mut raw = [0u8; 8];
    v.emit(&mut raw);
    let word = |i: usize| u32::from_ne_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
    SocketFile { ino: word(0), dev: word(4) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn counts_connections_of_one_listener_only() {
        let t = tempfile::tempdir().unwrap();
        let (pa, pb) = (t.path().join("a.sock"), t.path().join("b.sock"));
        let (la, _lb) = (UnixListener::bind(&pa).unwrap(), UnixListener::bind(&pb).unwrap());
        let fa = SocketFile::of(&pa).unwrap();
        assert_eq!(count(fa).unwrap(), 0, "a listener alone is no connection");
        // Pending in the backlog, then accepted: counted either way.
        let c1 = UnixStream::connect(&pa).unwrap();
        let _c2 = UnixStream::connect(&pa).unwrap();
        let _other = UnixStream::connect(&pb).unwrap();
        assert_eq!(count(fa).unwrap(), 2);
        let (s1, _) = la.accept().unwrap();
        assert_eq!(count(fa).unwrap(), 2);
        drop((c1, s1));
        assert_eq!(count(fa).unwrap(), 1);
    }
}
