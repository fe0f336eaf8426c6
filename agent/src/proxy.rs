//! The proxy: the client's bytes go to the instance socket and back,
//! unparsed, until either side closes.
//!
//! Both directions move with splice(2), never through user space
//! (proxy/splice.rs).
//!
//! One thing is added, never changed: when the instance dies under a client
//! that is still connected (OOM kill, pids limit, crash), the client would
//! only see "transport error". So the daemon-to-client direction tracks
//! HTTP/2 frame boundaries (9-byte headers, no parsing of payloads; the
//! splice walk reads the headers and skips the payloads), and if
//! the daemon's side ends at a boundary the proxy appends one GOAWAY frame
//! whose debug data says why, then closes. gRPC clients (grpc-go in buildx
//! and buildctl, h2 in Rust) put that debug data into the error they show.

pub mod splice;

use crate::instance::Instance;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// How long a dead instance's reason may take to arrive (the shim reports
/// after its wipe).
const NOTE_WAIT: Duration = Duration::from_secs(3);
/// HTTP/2 frame types and the INTERNAL_ERROR code (RFC 9113).
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const INTERNAL_ERROR: u32 = 0x2;

/// Pipes `client` to the instance's daemon; returns bytes (up, down).
pub async fn pipe(client: UnixStream, inst: &Instance) -> io::Result<(u64, u64)> {
    let upstream = connect(&inst.socket())?;
    let (cr, mut cw) = client.into_split();
    let (ur, mut uw) = upstream.into_split();
    let client_eof = AtomicBool::new(false);
    let up = async {
        let (n, eof) = splice::splice(cr.as_ref(), uw.as_ref(), None).await;
        client_eof.store(eof, Ordering::SeqCst);
        let _ = uw.shutdown().await;
        n
    };
    let down = async {
        let mut frames = Frames::default();
        let (n, _) = splice::splice(ur.as_ref(), cw.as_ref(), Some(&mut frames)).await;
        // The daemon's side ended while the client still talks: tell why.
        if !client_eof.load(Ordering::SeqCst) && frames.at_boundary() && frames.is_h2() {
            match inst.wait_end_note(NOTE_WAIT).await {
                Some(note) => {
                    tracing::debug!(instance = %inst.id, "telling the client why its instance ended");
                    let _ = cw.write_all(&goaway(&note)).await;
                }
                None => tracing::debug!(instance = %inst.id, "daemon closed a connection; no end note"),
            }
        }
        let _ = cw.shutdown().await;
        n
    };
    let (up, down) = tokio::join!(up, down);
    Ok((up, down))
}

/// Connects to the instance socket without a reactor turn: a unix connect
/// completes in the call or fails (EAGAIN: the daemon's backlog is full,
/// which tokio's `UnixStream::connect` also returns as an error), but
/// tokio's connect then waits for the reactor to report the socket
/// writable, a wake-up of another worker on every new connection.
fn connect(path: &std::path::Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(path)?;
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", path.display())))?;
    UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
}

/// Tracks HTTP/2 frame boundaries in a byte stream without keeping data.
/// Public for the fuzz target (it reads a daemon's bytes).
#[derive(Debug, Default)]
pub struct Frames {
    header: [u8; 9],
    have: usize,
    /// Payload bytes left in the current frame.
    left: usize,
    first_type: Option<u8>,
    broken: bool,
}

impl Frames {
    pub fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() && !self.broken {
            if self.left > 0 {
                let n = self.left.min(b.len());
                self.left -= n;
                b = &b[n..];
                continue;
            }
            let n = (9 - self.have).min(b.len());
            self.header[self.have..self.have + n].copy_from_slice(&b[..n]);
            self.have += n;
            b = &b[n..];
            if self.have == 9 {
                self.left = u32::from_be_bytes([0, self.header[0], self.header[1], self.header[2]]) as usize;
                let kind = self.header[3];
                if self.first_type.is_none() {
                    self.first_type = Some(kind);
                    // A server's first frame is SETTINGS; anything else is
                    // not HTTP/2 and gets no frame from us.
                    self.broken = kind != SETTINGS;
                }
                self.have = 0;
            }
        }
    }

    /// Whether the stream is still walked (it began as HTTP/2 and every
    /// byte so far was seen).
    pub fn tracking(&self) -> bool {
        !self.broken
    }

    /// Payload bytes of the current frame still to come: the splice walk
    /// skips these without reading them.
    pub fn payload_left(&self) -> usize {
        self.left
    }

    /// Counts `n <= payload_left()` payload bytes as seen, unread.
    pub fn skip(&mut self, n: usize) {
        self.left -= n.min(self.left);
    }

    /// Some bytes went by unseen: no boundary is known from now on, so no
    /// note will be written on this stream.
    pub fn give_up(&mut self) {
        self.broken = true;
    }

    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0 && !self.broken
    }

    pub fn is_h2(&self) -> bool {
        self.first_type == Some(SETTINGS) && !self.broken
    }
}

/// Most bytes of the note a GOAWAY carries (well under the 16 KiB frame).
const MAX_NOTE: usize = 4000;

/// A GOAWAY frame on stream 0. Last-stream-id is the maximum, so clients
/// treat their calls as processed (no transparent retry onto a fresh
/// instance) and fail them with our debug data.
fn goaway(note: &str) -> Vec<u8> {
    // Cut at a char boundary: clients show the debug data as text.
    let mut cut = note.len().min(MAX_NOTE);
    while !note.is_char_boundary(cut) {
        cut -= 1;
    }
    let debug: &[u8] = &note.as_bytes()[..cut];
    let len = 8 + debug.len();
    let mut f = Vec::with_capacity(9 + len);
    f.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    f.push(GOAWAY);
    f.push(0);
    f.extend_from_slice(&0u32.to_be_bytes());
    f.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    f.extend_from_slice(&INTERNAL_ERROR.to_be_bytes());
    f.extend_from_slice(debug);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let mut f = (payload as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, 0, 0, 0, 0, 1]);
        f.extend(std::iter::repeat_n(0xAB, payload));
        f
    }

    #[test]
    fn boundaries_survive_any_split() {
        let stream: Vec<u8> = [frame(SETTINGS, 6), frame(0x0, 300), frame(0x1, 17)].concat();
        for cut in 0..stream.len() {
            let mut f = Frames::default();
            f.feed(&stream[..cut]);
            f.feed(&stream[cut..]);
            assert!(f.at_boundary() && f.is_h2(), "cut at {cut}");
        }
        let mut f = Frames::default();
        f.feed(&stream[..stream.len() - 1]);
        assert!(!f.at_boundary(), "a frame cut short is no boundary");
    }

    #[test]
    fn non_h2_streams_get_nothing() {
        let mut f = Frames::default();
        f.feed(b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(!f.is_h2() && !f.at_boundary());
    }

    /// The instance connect completes in the call (no reactor turn) and
    /// says which path failed.
    #[tokio::test]
    async fn connect_is_ready_at_once_and_names_a_missing_path() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("d.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let c = connect(&path).unwrap();
        let (mut a, _) = l.accept().unwrap();
        // Connected in the call: a write goes through at once.
        assert_eq!(nix::unistd::write(&c, b"x").unwrap(), 1);
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut a, &mut b).unwrap();
        assert_eq!(&b, b"x");
        let e = connect(&t.path().join("gone.sock")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("gone.sock"), "{e}");
    }

    #[test]
    fn goaway_frame_layout() {
        let g = goaway("berth: OOM");
        assert_eq!(&g[..3], &[0, 0, 18]);
        assert_eq!(g[3], GOAWAY);
        assert_eq!(&g[5..9], &[0, 0, 0, 0]);
        assert_eq!(&g[9..13], &[0x7f, 0xff, 0xff, 0xff]);
        assert_eq!(&g[13..17], &[0, 0, 0, 2]);
        assert_eq!(&g[17..], b"berth: OOM");
        let mut f = Frames::default();
        f.feed(&frame(SETTINGS, 0));
        f.feed(&g);
        assert!(f.at_boundary());
    }

    #[test]
    fn goaway_note_is_cut_at_a_char_boundary() {
        // 3999 ASCII bytes then a 3-byte char: a cut at 4000 would split it.
        let note = format!("{}€tail", "x".repeat(MAX_NOTE - 1));
        let g = goaway(&note);
        let debug = &g[17..];
        assert_eq!(debug.len(), MAX_NOTE - 1);
        assert!(std::str::from_utf8(debug).is_ok());
        assert_eq!(u32::from_be_bytes([0, g[0], g[1], g[2]]) as usize, 8 + debug.len());
        assert_eq!(goaway(&"y".repeat(5000))[17..].len(), MAX_NOTE);
    }
}
