//! gRPC over unix sockets: channels and client helpers for tests and fakeclient.

use crate::proto::control::control_client::ControlClient;
use crate::proto::fake::fake_client::FakeClient;
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Messages up to this size are accepted by the clients built here (the
/// tonic default is 4 MiB, too small for the larger Stream/Echo chunks).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Connects one HTTP/2 connection over the unix socket at `socket` (eagerly:
/// an error here means the socket did not accept). When the connection
/// breaks, the channel reconnects on the next call, to the same path.
pub async fn try_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = socket.to_path_buf();
    // The URI is required by the API but unused: the connector ignores it.
    Endpoint::try_from("http://[::]:50051")?
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// [`try_channel`], panicking with the socket path and the cause on failure.
pub async fn channel(socket: &Path) -> Channel {
    match try_channel(socket).await {
        Ok(c) => c,
        Err(e) => panic!("cannot connect to {}: {}", socket.display(), error_chain(&e)),
    }
}

/// A `berth.fake.v1.Fake` client on a fresh connection (panics if it cannot connect).
pub async fn fake_client(socket: &Path) -> FakeClient<Channel> {
    FakeClient::new(channel(socket).await).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE)
}

/// A `moby.buildkit.v1.Control` client on a fresh connection (panics if it cannot connect).
pub async fn control_client(socket: &Path) -> ControlClient<Channel> {
    ControlClient::new(channel(socket).await)
}

/// `grpc.health.v1.Health/Check` for service `""` on a fresh connection. A
/// failed connect is reported as `Unavailable`; a server without the health
/// service answers `Unimplemented`.
pub async fn health_check(socket: &Path) -> Result<ServingStatus, tonic::Status> {
    let ch = try_channel(socket)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect {}: {}", socket.display(), error_chain(&e))))?;
    let reply = HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await?.into_inner();
    Ok(ServingStatus::try_from(reply.status).unwrap_or(ServingStatus::Unknown))
}

/// The error and all its sources, `": "`-joined (tonic's transport errors
/// hide the useful part, e.g. "No such file or directory", in the sources).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The name of a gRPC code as tonic spells it (`"ResourceExhausted"`).
pub fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

/// A gRPC call on a raw h2 connection, as `raw_fake_call` leaves it: the
/// response still to come, the request's (finished) send side, the
/// connection's client handle and its driver task. Kept raw so a test sees
/// what a grpc-go client sees of the connection, GOAWAY debug data included.
pub type RawCall = (
    h2::client::ResponseFuture,
    h2::SendStream<bytes::Bytes>,
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
);

/// Calls `berth.fake.v1.Fake/<method>` with the encoded message `msg` on a
/// fresh raw h2 connection to `socket`; the body (one length-prefixed
/// message) is sent whole.
pub async fn raw_fake_call(socket: &Path, method: &str, msg: &[u8]) -> RawCall {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(msg);
    let req = http::Request::post(format!("http://berth/berth.fake.v1.Fake/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    send.send_data(bytes::Bytes::from(body), true).unwrap();
    (resp, send, client, conn)
}
