//! Readiness: a daemon is ready when a real gRPC call succeeds on its socket.
//! buildkitd registers grpc.health.v1 (since v0.13); the answer SERVING is
//! what we wait for.

use crate::proto::control::control_client::ControlClient;
use crate::proto::control::ListWorkersRequest;
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Per-attempt bound: a daemon that accepts but never answers must not stall
/// the start loop past its deadline.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// A gRPC channel over a unix socket.
pub async fn channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = socket.to_path_buf();
    Endpoint::from_static("http://berth.invalid")
        .connect_timeout(ATTEMPT_TIMEOUT)
        .timeout(ATTEMPT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
}

/// True when the daemon on `socket` answers: grpc.health.v1 reports
/// SERVING, or, for daemons older than buildkit v0.13 that have no health
/// service (UNIMPLEMENTED), `Control.ListWorkers` returns a worker.
pub async fn ready(socket: &Path) -> bool {
    let Ok(ch) = channel(socket).await else { return false };
    let mut client = HealthClient::new(ch.clone());
    match tokio::time::timeout(ATTEMPT_TIMEOUT, client.check(HealthCheckRequest { service: String::new() })).await {
        Ok(Ok(resp)) => resp.into_inner().status == ServingStatus::Serving as i32,
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => list_workers(ch).await,
        _ => false,
    }
}

async fn list_workers(ch: Channel) -> bool {
    let mut client = ControlClient::new(ch);
    match tokio::time::timeout(ATTEMPT_TIMEOUT, client.list_workers(ListWorkersRequest::default())).await {
        Ok(Ok(resp)) => !resp.into_inner().record.is_empty(),
        _ => false,
    }
}
