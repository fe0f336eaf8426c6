//! The client-to-daemon direction of the proxy without copies through user
//! space: socket -> pipe -> socket with splice(2) (nix's safe wrapper, as the
//! agent forbids unsafe code). This is the direction of build contexts,
//! local sources and cache imports, and nothing in it needs reading.
//!
//! The other direction keeps the copy (proxy.rs): it must see every HTTP/2
//! frame header for the GOAWAY note, and gRPC servers (grpc-go in buildkitd,
//! h2 in fakekitd) send DATA frames of at most 16 KiB, so splicing it frame
//! by frame (read the 9-byte header, write it, splice the payload in and
//! out) takes four system calls per 16 KiB where the copy takes two per read
//! of up to 256 KiB. See docs/benchmarks.md, figure 2.
//!
//! Descriptors (invariant 6): the pipe is created when bytes flow and closed
//! when the client's socket is drained, like the copy's buffers, so an idle
//! connection holds its two sockets only, and a busy one four (bounds.rs
//! counts connections per client; each costs at most four descriptors).

use nix::fcntl::{fcntl, splice as nix_splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;
use std::io;
use std::os::fd::OwnedFd;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The pipe's capacity: as the copy's big buffer, fewer calls per byte
/// (Linux's default pipe is 64 KiB; root may set up to pipe-max-size).
const PIPE_BYTES: usize = 256 * 1024;

/// Moves bytes from `r` to `w` until EOF or an error on either side;
/// returns the bytes moved and whether `r` reached a clean EOF.
pub async fn splice(r: &UnixStream, w: &UnixStream) -> (u64, bool) {
    let mut total = 0u64;
    loop {
        if r.readable().await.is_err() {
            return (total, false);
        }
        let Ok((pr, pw)) = pipe() else { return (total, false) };
        // One burst: until the client's socket is drained; then the pipe goes.
        loop {
            let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
            let n = match r.try_io(Interest::READABLE, || to_io(nix_splice(r, None, &pw, None, PIPE_BYTES, flags))) {
                Ok(0) => return (total, true),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return (total, false),
            };
            let mut left = n;
            while left > 0 {
                match w.try_io(Interest::WRITABLE, || to_io(nix_splice(&pr, None, w, None, left, flags))) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if w.writable().await.is_err() {
                            return (total, false);
                        }
                    }
                    Err(_) => return (total, false),
                }
            }
            total += n as u64;
        }
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

    /// Bytes arrive intact and in order, across bursts and a slow reader.
    #[tokio::test]
    async fn moves_everything_in_order() {
        let (mut client, proxy_in) = UnixStream::pair().unwrap();
        let (proxy_out, mut daemon) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let send = data.clone();
        let writer = tokio::spawn(async move {
            for (k, part) in send.chunks(700_001).enumerate() {
                client.write_all(part).await.unwrap();
                if k % 2 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
            client.shutdown().await.unwrap();
        });
        let relay = tokio::spawn(async move { splice(&proxy_in, &proxy_out).await });
        let mut got = Vec::new();
        daemon.read_to_end(&mut got).await.unwrap_or_else(|e| panic!("read: {e}"));
        writer.await.unwrap();
        let (n, eof) = relay.await.unwrap();
        assert!(eof);
        assert_eq!(n as usize, data.len());
        assert!(got == data, "bytes differ");
    }
}
