//! Both directions of the proxy without copies through user space: socket
//! -> pipe -> socket with splice(2) (nix's safe wrappers, as the agent
//! forbids unsafe code). Hand-written on nix rather than a crate: tokio has
//! no splice, and the daemon-to-client direction needs the frame walk below.
//!
//! The daemon-to-client direction must still see every HTTP/2 frame header
//! for the GOAWAY note (proxy.rs, `Frames`). It gets them without copying the
//! payload: each burst spliced from the socket into the main pipe is first
//! duplicated into a peek pipe with tee(2) (page references, no copy), the
//! main pipe is spliced out to the client, and the frame walk then reads the
//! peek pipe: a small read where a header is due (a few hundred bytes, so
//! runs of small frames take one read), and a splice to /dev/null across
//! each large payload. Splicing frame by frame instead (read the header,
//! write it, splice the payload) would cut the client's stream into two
//! socket buffers per 16 KiB frame.
//!
//! Descriptors and memory (invariant 6): the pipes exist only while bytes
//! flow. A direction creates them when its socket turns readable and drops
//! them once the socket has stayed drained for `KEEP` (a transfer that
//! pauses between messages keeps its pipes; an idle connection holds its
//! two sockets only). A busy connection holds at most eight descriptors: two
//! sockets, one pipe up, two pipes down.

use crate::proxy::Frames;
use nix::fcntl::{fcntl, splice as nix_splice, tee, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::{pipe2, read};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The pipe's capacity: more bytes per call (Linux's default pipe is 64
/// KiB; root may set up to /proc/sys/fs/pipe-max-size).
const PIPE_BYTES: usize = 256 * 1024;
/// How long a drained direction keeps its pipes before giving them back.
const KEEP: Duration = Duration::from_millis(50);
/// Where a header is due, the walk reads this much of the peek pipe (the
/// header, and the small frames that often follow it, in one read).
const PEEK_READ: usize = 512;
/// A payload at least this long is skipped by a splice to /dev/null;
/// shorter ones are read with the headers around them.
const SKIP_AT: usize = 2048;

/// Moves bytes from `r` to `w` until EOF or an error on either side;
/// returns the bytes moved and whether `r` reached a clean EOF. With
/// `frames`, every byte moved is walked by it (daemon to client).
pub async fn splice(r: &UnixStream, w: &UnixStream, mut frames: Option<&mut Frames>) -> (u64, bool) {
    let mut total = 0u64;
    let mut pipes: Option<Pipes> = None;
    loop {
        let ready = if pipes.is_some() {
            match tokio::time::timeout(KEEP, r.readable()).await {
                Ok(ready) => ready,
                Err(_) => {
                    pipes = None; // drained for a while: give the pipes back
                    r.readable().await
                }
            }
        } else {
            r.readable().await
        };
        if ready.is_err() {
            return (total, false);
        }
        if pipes.is_none() {
            let track = frames.as_ref().is_some_and(|f| f.tracking());
            match Pipes::new(track) {
                Ok(p) => pipes = Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the proxy's pipe; ending the connection");
                    return (total, false);
                }
            }
        }
        let Some(p) = pipes.as_ref() else { return (total, false) };
        // One burst: until the socket is drained.
        loop {
            let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
            let n = match r.try_io(Interest::READABLE, || to_io(nix_splice(r, None, &p.w, None, PIPE_BYTES, flags))) {
                Ok(0) => return (total, true),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return (total, false),
            };
            if relay(p, w, n, frames.as_deref_mut()).await.is_err() {
                return (total, false);
            }
            total += n as u64;
        }
    }
}

/// The pipes of one direction while bytes flow.
struct Pipes {
    r: OwnedFd,
    w: OwnedFd,
    /// The frame walk's copy of each burst (tee'd page references).
    peek: Option<(OwnedFd, OwnedFd)>,
}

impl Pipes {
    fn new(track: bool) -> io::Result<Pipes> {
        let (r, w) = pipe()?;
        let peek = if track { Some(pipe()?) } else { None };
        Ok(Pipes { r, w, peek })
    }
}

/// Moves the `n` bytes in the main pipe out to `w`, walking them first
/// through `frames` when it tracks.
async fn relay(p: &Pipes, w: &UnixStream, n: usize, mut frames: Option<&mut Frames>) -> io::Result<()> {
    let mut left = n;
    while left > 0 {
        // tee takes from the head of the main pipe, so each round tees,
        // sends and walks the same k bytes (one round unless tee is short).
        let walk = match (frames.as_deref_mut(), &p.peek) {
            (Some(f), Some((pr, pw))) if f.tracking() => match tee(&p.r, pw, left, SpliceFFlags::SPLICE_F_NONBLOCK) {
                Ok(k) if k > 0 => Some((f, pr, k)),
                _ => {
                    // Cannot see the bytes: no note on this connection.
                    f.give_up();
                    None
                }
            },
            _ => None,
        };
        let k = walk.as_ref().map_or(left, |w| w.2);
        send(&p.r, w, k).await?;
        if let Some((f, pr, k)) = walk {
            if walk_frames(pr, k, f).is_err() {
                f.give_up();
            }
        }
        left -= k;
    }
    Ok(())
}

/// Splices `k` bytes from the pipe `pr` to `w`, waiting while `w` is full.
async fn send(pr: &OwnedFd, w: &UnixStream, mut k: usize) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    while k > 0 {
        match w.try_io(Interest::WRITABLE, || to_io(nix_splice(pr, None, w, None, k, flags))) {
            Ok(m) => k -= m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => w.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Feeds `k` bytes of the peek pipe to `frames`: headers are read, large
/// payloads are skipped into /dev/null unread.
fn walk_frames(pr: &OwnedFd, mut k: usize, frames: &mut Frames) -> io::Result<()> {
    let mut buf = [0u8; PEEK_READ];
    while k > 0 {
        if !frames.tracking() {
            // Not HTTP/2 after all: nothing more to see in this burst.
            to_io(nix_splice(pr, None, devnull()?, None, k, SpliceFFlags::empty()))?;
            return Ok(());
        }
        let skip = frames.payload_left().min(k);
        let m = if skip >= SKIP_AT {
            let m = to_io(nix_splice(pr, None, devnull()?, None, skip, SpliceFFlags::empty()))?;
            frames.skip(m);
            m
        } else {
            let want = k.min(PEEK_READ);
            let m = to_io(read(pr, &mut buf[..want]))?;
            frames.feed(&buf[..m]);
            m
        };
        if m == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        k -= m;
    }
    Ok(())
}

/// /dev/null, opened once per process, where skipped payloads go.
fn devnull() -> io::Result<&'static File> {
    static NULL: OnceLock<io::Result<File>> = OnceLock::new();
    match NULL.get_or_init(|| std::fs::OpenOptions::new().write(true).open("/dev/null")) {
        Ok(f) => Ok(f),
        Err(e) => Err(io::Error::new(e.kind(), format!("/dev/null: {e}"))),
    }
}

fn to_io(r: nix::Result<usize>) -> io::Result<usize> {
    r.map_err(io::Error::from)
}

/// A non-blocking pipe, grown to PIPE_BYTES where allowed (a smaller pipe
/// only means more calls).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32));
    Ok((r, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Relays `data` written in `parts` (with pauses) through `splice`;
    /// returns what arrived, the byte count and the EOF flag.
    async fn relay_through(data: Vec<u8>, parts: usize, frames: Option<&mut Frames>) -> (Vec<u8>, u64, bool) {
        let (mut client, proxy_in) = UnixStream::pair().unwrap();
        let (proxy_out, mut daemon) = UnixStream::pair().unwrap();
        let writer = tokio::spawn(async move {
            for (k, part) in data.chunks(parts).enumerate() {
                client.write_all(part).await.unwrap();
                if k % 2 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            client.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            daemon.read_to_end(&mut got).await.unwrap_or_else(|e| panic!("read: {e}"));
            got
        });
        let (n, eof) = splice(&proxy_in, &proxy_out, frames).await;
        drop(proxy_out);
        writer.await.unwrap();
        (reader.await.unwrap(), n, eof)
    }

    /// Bytes arrive intact and in order, across bursts and a slow reader.
    #[tokio::test]
    async fn moves_everything_in_order() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let (got, n, eof) = relay_through(data.clone(), 700_001, None).await;
        assert!(eof);
        assert_eq!(n as usize, data.len());
        assert!(got == data, "bytes differ");
    }

    /// An HTTP/2-like stream of SETTINGS, then DATA frames of every size
    /// from 0 to past the skip threshold, with runs of tiny frames between.
    fn h2_stream(frames: usize) -> Vec<u8> {
        let mut s = Vec::new();
        let mut push = |kind: u8, len: usize, seed: usize| {
            s.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
            s.extend_from_slice(&[kind, 0, 0, 0, 0, 1]);
            s.extend((0..len).map(|i| (i * 31 + seed) as u8));
        };
        push(0x4, 6, 0);
        for i in 0..frames {
            let len = match i % 5 {
                0 => 16384,
                1 => i % 3000,
                2 => 4,
                3 => 0,
                _ => 9000 + i % 7000,
            };
            push(if i % 5 == 2 { 0x8 } else { 0x0 }, len, i);
        }
        s
    }

    /// The walk over tee'd pipes sees every frame header: the tracker ends
    /// at the boundary exactly when the stream does, and the bytes are the
    /// ones sent (the walk never takes from what the client gets).
    #[tokio::test]
    async fn frame_walk_keeps_boundaries_and_bytes() {
        let data = h2_stream(600);
        let mut f = Frames::default();
        // Odd part sizes so bursts end inside headers and payloads.
        let (got, n, eof) = relay_through(data.clone(), 65_537, Some(&mut f)).await;
        assert!(eof && n as usize == data.len() && got == data, "bytes differ");
        assert!(f.is_h2() && f.at_boundary(), "{f:?}");

        let mut f = Frames::default();
        let cut = data.len() - 5000; // inside the last large payload
        let (got, _, _) = relay_through(data[..cut].to_vec(), 4099, Some(&mut f)).await;
        assert!(got == data[..cut], "bytes differ");
        assert!(f.is_h2() && !f.at_boundary(), "a frame cut short is no boundary: {f:?}");
    }

    /// A stream that is not HTTP/2 stops the walk and still moves intact.
    #[tokio::test]
    async fn non_h2_stream_moves_unwalked() {
        let mut data = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        data.extend((0..1_000_000u32).map(|i| (i % 253) as u8));
        let mut f = Frames::default();
        let (got, _, eof) = relay_through(data.clone(), 100_000, Some(&mut f)).await;
        assert!(eof && got == data);
        assert!(!f.tracking() && !f.at_boundary());
    }
}
