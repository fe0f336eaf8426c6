//! Refusing a connection: the agent never parses the client's gRPC, so to
//! refuse a connection it answers it as a tiny HTTP/2 server whose every
//! call fails with one status (which error.rs chooses). buildx and buildctl
//! then print the message as is.

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::time::Duration;
use tokio::net::UnixStream;
use tonic::Status;

/// How long a refused client gets to read its answer.
const REFUSE_LINGER: Duration = Duration::from_secs(5);

/// Answers every request on `stream` with `status`, then closes it.
pub async fn refuse(stream: UnixStream, status: Status) {
    let svc = hyper::service::service_fn(move |_req| {
        let status = status.clone();
        async move { Ok::<_, std::convert::Infallible>(status.into_http::<Empty<Bytes>>()) }
    });
    let conn =
        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc);
    // A garbage client fails the h2 handshake; that ends it too.
    let _ = tokio::time::timeout(REFUSE_LINGER, conn).await;
}
