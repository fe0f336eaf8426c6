//! The proxy: the client's bytes go to the instance socket and back,
//! unparsed, until either side closes.
#![forbid(unsafe_code)]

use std::io;
use std::path::Path;
use tokio::net::UnixStream;

/// Buffer per direction. Larger than tokio's 8 KiB default: layer blobs move
/// in big writes and fewer syscalls matter for the throughput goal.
const BUF: usize = 256 * 1024;

/// Pipes `client` to the daemon at `socket`; returns bytes (up, down).
pub async fn pipe(mut client: UnixStream, socket: &Path) -> io::Result<(u64, u64)> {
    let mut upstream = UnixStream::connect(socket).await?;
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await
}
