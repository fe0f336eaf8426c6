//! fakekitd's image resolver (`Fake.FetchManifest`): what buildkitd does
//! when a Dockerfile says `FROM busybox`, with the registry settings of the
//! `buildkitd.toml` it was started with (`--config`). The host order and
//! per-host settings follow buildkit's `util/resolver`: each mirror of
//! `[registry."<domain>"]` first, with the `http`, `insecure`, `ca` of the
//! mirror's own `[registry."<mirror host>"]` table, then the domain itself
//! (docker.io is served by registry-1.docker.io) with the domain's table.
//!
//! Only what a manifest fetch needs: `GET /v2/<repo>/manifests/<ref>` with
//! the OCI and Docker Accept headers, no token auth. HTTP/1.1 over TCP or
//! rustls (hyper's client connection); trusted roots are the configured CAs
//! only, since fakekitd never talks to a public registry. [`request`] is also
//! the registry fixture's client (tests/src/registry.rs) for pushes.

use crate::proto::fake::{FetchManifestReply, FetchManifestRequest};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// The manifest types buildkit's resolver accepts, as it sends them.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, */*";

/// An image reference, normalized as docker does (`busybox` is
/// `docker.io/library/busybox:latest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub domain: String,
    pub repo: String,
    /// A tag or a digest.
    pub reference: String,
}

pub fn parse_reference(s: &str) -> Result<Reference, String> {
    let (name, reference) = match s.split_once('@') {
        Some((n, d)) => (n, d.to_string()),
        None => match s.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t.to_string()),
            _ => (s, "latest".to_string()),
        },
    };
    let (domain, repo) = match name.split_once('/') {
        Some((d, r)) if d.contains('.') || d.contains(':') || d == "localhost" => (d.to_string(), r.to_string()),
        _ => ("docker.io".to_string(), name.to_string()),
    };
    let repo = if domain == "docker.io" && !repo.contains('/') { format!("library/{repo}") } else { repo };
    if repo.is_empty() || reference.is_empty() || repo.contains("//") {
        return Err(format!("invalid reference {s:?}"));
    }
    Ok(Reference { domain, repo, reference })
}

/// How one host is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// Plain HTTP.
    None,
    /// HTTPS, verified against these CA files (PEM).
    Verify(Vec<String>),
    /// HTTPS without verification (`insecure = true`); `fallback`: then HTTP.
    Skip { fallback: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// "host[:port]".
    pub host: String,
    /// "/v2" or "/v2/<mirror path>".
    pub path: String,
    pub tls: Tls,
    /// A mirror: requests carry `?ns=<domain>`, as containerd's resolver sends.
    pub mirror_of: Option<String>,
}

fn table<'a>(conf: &'a toml::Table, host: &str) -> Option<&'a toml::Table> {
    conf.get("registry")?.as_table()?.get(host)?.as_table()
}

fn is_localhost(host: &str) -> bool {
    let h = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    matches!(h, "localhost" | "127.0.0.1" | "::1" | "[::1]")
}

/// buildkit's `fillInsecureOpts`.
fn host_opts(host: &str, path: String, t: Option<&toml::Table>) -> Host {
    let flag = |k: &str| t.and_then(|t| t.get(k)).and_then(|v| v.as_bool());
    let http = flag("http").unwrap_or_else(|| is_localhost(host));
    let tls = if flag("insecure") == Some(true) {
        Tls::Skip { fallback: http }
    } else if http {
        Tls::None
    } else {
        let cas = t.and_then(|t| t.get("ca")).and_then(|v| v.as_array()).cloned().unwrap_or_default();
        Tls::Verify(cas.iter().filter_map(|v| v.as_str().map(String::from)).collect())
    };
    Host { host: host.to_string(), path, tls, mirror_of: None }
}

/// The hosts buildkit tries for `domain`, in order.
pub fn hosts(conf: &toml::Table, domain: &str) -> Vec<Host> {
    let own = table(conf, domain);
    let mut out = Vec::new();
    let mirrors = own.and_then(|t| t.get("mirrors")).and_then(|v| v.as_array()).cloned().unwrap_or_default();
    for m in mirrors.iter().filter_map(|v| v.as_str()) {
        let bare = m.split_once("://").map(|(_, r)| r).unwrap_or(m);
        let (host, path) = match bare.split_once('/') {
            Some((h, p)) => (h, format!("/v2/{}", p.trim_end_matches('/'))),
            None => (bare, "/v2".to_string()),
        };
        out.push(Host { mirror_of: Some(domain.to_string()), ..host_opts(host, path, table(conf, host)) });
    }
    let origin = if domain == "docker.io" { "registry-1.docker.io" } else { domain };
    out.push(host_opts(origin, "/v2".to_string(), own));
    out
}

/// One HTTP response, read whole.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// Reads the `ca` files into a root store.
fn roots(cas: &[String]) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    for ca in cas {
        let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(ca)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| format!("failed to read {ca}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("{ca}: no PEM certificate in it"));
        }
        for c in certs {
            store.add(c).map_err(|e| format!("{ca}: {e}"))?;
        }
    }
    Ok(store)
}

/// A TLS failure in the words buildkitd (Go's crypto/tls) uses for it.
fn tls_error(e: &std::io::Error) -> String {
    use rustls::{CertificateError, Error};
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<Error>());
    match inner {
        Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            format!("tls: failed to verify certificate: x509: certificate signed by unknown authority ({e})")
        }
        Some(Error::InvalidCertificate(CertificateError::NotValidForName))
        | Some(Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
            format!("tls: failed to verify certificate: x509: certificate is not valid for this host ({e})")
        }
        _ => format!("tls: {e}"),
    }
}

/// `method host+path` over HTTP/1.1, with `headers` and `body`; `tls` as
/// for a registry host (`Skip` never falls back here).
pub async fn request(
    method: &str,
    host: &str,
    path: &str,
    tls: &Tls,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Answer, String> {
    let secure = !matches!(tls, Tls::None);
    let target = if host.contains(':') && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:{}", if secure { 443 } else { 80 })
    };
    let tcp = TcpStream::connect(&target).await.map_err(|e| format!("dial tcp {target}: {e}"))?;
    let mut req = http::Request::builder().method(method).uri(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).map_err(|e| format!("request: {e}"))?;
    if !secure {
        return exchange(TokioIo::new(tcp), req).await;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let config = match tls {
        Tls::Verify(cas) => builder.with_root_certificates(roots(cas)?).with_no_client_auth(),
        _ => builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify)).with_no_client_auth(),
    };
    let name_host = target.rsplit_once(':').map(|(h, _)| h).unwrap_or(&target).trim_matches(['[', ']']);
    let name = ServerName::try_from(name_host.to_string()).map_err(|e| format!("tls: server name {name_host}: {e}"))?;
    let stream =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| tls_error(&e))?;
    exchange(TokioIo::new(stream), req).await
}

async fn exchange<S>(io: TokioIo<S>, req: http::Request<Full<Bytes>>) -> Result<Answer, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("http: {e}"))?;
    tokio::spawn(conn);
    let res = send.send_request(req).await.map_err(|e| format!("http: {e}"))?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map_err(|e| format!("http body: {e}"))?.to_bytes();
    Ok(Answer { status: parts.status.as_u16(), headers: parts.headers, body })
}

/// `insecure = true`: any certificate (buildkit's InsecureSkipVerify).
#[derive(Debug)]
struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

/// "sha256:<hex>" of `data`.
pub fn digest(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The manifest of `r` from one host.
async fn fetch_from(h: &Host, r: &Reference, tls: &Tls) -> Result<FetchManifestReply, String> {
    let ns = h.mirror_of.as_ref().map(|d| format!("?ns={d}")).unwrap_or_default();
    let path = format!("{}/{}/manifests/{}{ns}", h.path, r.repo, r.reference);
    let a = request("GET", &h.host, &path, tls, &[("accept", ACCEPT)], Vec::new()).await?;
    if a.status != 200 {
        let text = String::from_utf8_lossy(&a.body[..a.body.len().min(300)]).into_owned();
        return Err(format!("GET {path}: {} {}", a.status, text.trim()));
    }
    let digest = digest(&a.body);
    let header = |k: &str| a.headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let said = header("docker-content-digest");
    if !said.is_empty() && !r.reference.starts_with("sha256:") && said != digest {
        return Err(format!("GET {path}: Docker-Content-Digest {said} but the body hashes to {digest}"));
    }
    let scheme = if matches!(tls, Tls::None) { "http" } else { "https" };
    Ok(FetchManifestReply {
        digest,
        host: h.host.clone(),
        scheme: scheme.into(),
        media_type: header("content-type"),
        size: a.body.len() as u64,
        ..Default::default()
    })
}

/// The value of `--config` on the daemon's command line (last one wins).
fn config_arg(args: &[String]) -> Option<String> {
    let mut out = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--config=") {
            out = Some(v.to_string());
        } else if a == "--config" {
            out = it.next().cloned();
        }
    }
    out
}

/// `Fake.FetchManifest` for a daemon started with `args`.
pub async fn fetch_manifest(args: &[String], req: FetchManifestRequest) -> FetchManifestReply {
    let config = config_arg(args).unwrap_or_default();
    let fail = |error: String| FetchManifestReply { error, config: config.clone(), ..Default::default() };
    let conf: toml::Table = if config.is_empty() {
        toml::Table::new()
    } else {
        match std::fs::read_to_string(Path::new(&config))
            .map_err(|e| e.to_string())
            .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => return fail(format!("config {config}: {e}")),
        }
    };
    let r = match parse_reference(&req.reference) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let mut list = hosts(&conf, &r.domain);
    if req.mirrors_only {
        list.pop();
        if list.is_empty() {
            return fail(format!("no mirror configured for {} in {config:?}", r.domain));
        }
    }
    let limit = Duration::from_millis(if req.timeout_ms == 0 { 5000 } else { req.timeout_ms as u64 });
    let mut attempts = Vec::new();
    for h in &list {
        let tries = match &h.tls {
            Tls::Skip { fallback: true } => vec![h.tls.clone(), Tls::None],
            t => vec![t.clone()],
        };
        for tls in tries {
            match tokio::time::timeout(limit, fetch_from(h, &r, &tls)).await {
                Ok(Ok(mut reply)) => {
                    reply.attempts = attempts;
                    reply.config = config;
                    return reply;
                }
                Ok(Err(e)) => attempts.push(format!("{}: {e}", h.host)),
                Err(_) => attempts.push(format!("{}: timed out after {limit:?}", h.host)),
            }
        }
    }
    let error = format!("failed to resolve {}: {}", req.reference, attempts.join("; "));
    FetchManifestReply { attempts, ..fail(error) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize_as_docker_does() {
        let r = |s: &str| parse_reference(s).unwrap();
        assert_eq!(
            r("busybox"),
            Reference { domain: "docker.io".into(), repo: "library/busybox".into(), reference: "latest".into() }
        );
        assert_eq!(r("docker.io/library/busybox:1.36").reference, "1.36");
        assert_eq!(r("docker.io/team/app").repo, "team/app");
        let p = r("10.1.2.3:5443/mirror-probe/x:1");
        assert_eq!(
            (p.domain.as_str(), p.repo.as_str(), p.reference.as_str()),
            ("10.1.2.3:5443", "mirror-probe/x", "1")
        );
        assert_eq!(r("localhost/a@sha256:00").reference, "sha256:00");
        assert!(parse_reference("a//b").is_err());
    }

    #[test]
    fn mirrors_come_first_with_their_own_settings() {
        let conf: toml::Table = r#"
            [registry."docker.io"]
            mirrors = ["10.0.0.1:5000", "https://m2.test/prefix/"]
            [registry."10.0.0.1:5000"]
            http = true
            [registry."m2.test"]
            ca = ["/x/ca.pem"]
            [registry."r.test:5443"]
            insecure = true
            http = true
        "#
        .parse()
        .unwrap();
        let h = hosts(&conf, "docker.io");
        let m = Some("docker.io".to_string());
        let host =
            |h: &str, p: &str, tls: Tls, m: Option<String>| Host { host: h.into(), path: p.into(), tls, mirror_of: m };
        assert_eq!(h[0], host("10.0.0.1:5000", "/v2", Tls::None, m.clone()));
        assert_eq!(h[1], host("m2.test", "/v2/prefix", Tls::Verify(vec!["/x/ca.pem".into()]), m));
        assert_eq!(h[2], host("registry-1.docker.io", "/v2", Tls::Verify(vec![]), None));
        assert_eq!(hosts(&conf, "r.test:5443")[0].tls, Tls::Skip { fallback: true });
        assert_eq!(hosts(&conf, "localhost:5000")[0].tls, Tls::None);
    }

    #[test]
    fn config_is_taken_from_the_command_line() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            config_arg(&a(&["--root", "r", "--config", "/i/buildkitd.toml"])).as_deref(),
            Some("/i/buildkitd.toml")
        );
        assert_eq!(config_arg(&a(&["--config=/c"])).as_deref(), Some("/c"));
        assert_eq!(config_arg(&a(&["--root", "r"])), None);
        assert_eq!(digest(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
