//! The HTTP endpoint: `/healthz` (the agent is alive), `/readyz` (it takes
//! new builds: not draining, and the cheap host checks pass) and `/metrics`.

use crate::Ctx;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{info, warn};

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener) {
    if let Ok(a) = listener.local_addr() {
        info!(http_addr = %a, "serving /healthz, /readyz and /metrics");
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&ctx, req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(code: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

fn route<B>(ctx: &Ctx, req: Request<B>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match not_ready(ctx) {
            None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Some(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n")),
        },
        "/metrics" => {
            ctx.refresh_gauges();
            reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", ctx.metrics.encode())
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "try /healthz, /readyz or /metrics\n".into()),
    }
}

/// Why the agent should get no new builds, if it should not. Cheap checks
/// only: this runs on every probe.
fn not_ready(ctx: &Ctx) -> Option<String> {
    if *ctx.draining.borrow() {
        return Some("draining".into());
    }
    if let Some(why) = ctx.kubelet.borrow().not_ready() {
        return Some(why);
    }
    if !ctx.daemon.is_file() {
        return Some(format!("daemon {} is gone", ctx.daemon.display()));
    }
    if !ctx.shim.is_file() {
        return Some(format!("shim {} is gone", ctx.shim.display()));
    }
    let probe = ctx.run.host.state_dir.join(".readyz");
    if let Err(e) = std::fs::write(&probe, b"") {
        warn!(error = %e, "state dir not writable");
        return Some(format!("state dir {} is not writable: {e}", ctx.run.host.state_dir.display()));
    }
    let _ = std::fs::remove_file(&probe);
    if let Some((_, p)) = ctx.layout.parents.iter().find(|(_, p)| !p.is_dir()) {
        return Some(format!("cgroup parent {} is gone", p.display()));
    }
    None
}
