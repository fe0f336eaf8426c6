//! Refusing a connection: the agent never parses the client's gRPC, so to
//! refuse a connection it answers it as a tiny HTTP/2 server whose every
//! call fails with one status (which error.rs chooses). The frames are
//! written by hand (trailers.rs), so clients that send a socket path as
//! `:authority` (grpc C-core, grpc-java), which the h2 server would reset,
//! get it too. buildx and buildctl then print the message as is.

use std::time::Duration;
use tokio::net::UnixStream;
use tonic::Status;

/// How long a refused client gets to read its answer.
const REFUSE_LINGER: Duration = Duration::from_secs(5);

/// Answers every request on `stream` with `status`, then closes it.
pub async fn refuse(stream: UnixStream, status: Status) {
    // A garbage client fails the preface; that ends it too.
    crate::trailers::answer(stream, status.code() as i32, status.message(), REFUSE_LINGER).await;
}
