//! A real registry in the loop: Debian's `docker-registry` (distribution
//! 2.8) served inside the world namespace of a [`World`], on two addresses
//! of a small private range picked per test and checked free: plain HTTP
//! (a pull-through mirror, an in-cluster registry) and TLS with a CA the
//! test makes (`openssl` CLI), both over one storage dir. The agent's
//! namespace routes the range through the world link, and the route is
//! checked before the first packet: nothing leaves the test's namespaces.
//!
//! [`Registry::push`] puts a small image (config blob, one layer, OCI
//! manifest) through the registry's HTTP API, with fakekitd's client
//! ([`crate::fakekitd::pull::request`]) on a thread inside the world
//! namespace. The processes die in Drop; the namespaces (and so the veth and
//! every address) go with the World.

use crate::fakekitd::pull::{digest, request, Tls};
use crate::netfix::{sh, World};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;

static COUNTER: AtomicUsize = AtomicUsize::new(0);
/// The registry binary of Debian's `docker-registry` package.
pub const BINARY: &str = "docker-registry";
/// What an operator would deny as the cluster's service range; the
/// fixture's addresses lie inside it (`--build-egress-allow` opens them).
pub const SERVICE_RANGE: &str = "10.96.0.0/12";
const HTTP_PORT: u16 = 5000;
const TLS_PORT: u16 = 5443;

pub struct Registry {
    /// Plain HTTP, and TLS signed by [`Registry::ca`].
    pub http: SocketAddr,
    pub tls: SocketAddr,
    /// The /29 the two addresses lie in (for `--build-egress-allow`).
    pub range: String,
    /// The test CA's certificate (PEM).
    pub ca: PathBuf,
    ns: String,
    dir: TempDir,
    procs: Vec<Child>,
}

/// A /29 of [`SERVICE_RANGE`] that neither namespace of `w` uses or routes yet.
fn pick_range(w: &World) -> (String, Ipv4Addr, Ipv4Addr) {
    let seed = std::process::id() as usize * 7 + COUNTER.fetch_add(1, Ordering::SeqCst) * 13;
    for i in 0..64 {
        let n = (seed + i) % 8192;
        let (b, c, d) = (96 + n / 512, (n / 2) % 256, (n % 2) * 128);
        let (a1, a2) =
            (Ipv4Addr::new(10, b as u8, c as u8, d as u8 + 1), Ipv4Addr::new(10, b as u8, c as u8, d as u8 + 2));
        let routed = Command::new("ip")
            .args(["-n", &w.agent_ns, "route", "get", &a1.to_string()])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(true);
        let used = sh(&["ip", "-n", &w.world_ns, "-o", "-4", "addr"]).contains(&format!("10.{b}.{c}."));
        if !routed && !used {
            return (format!("10.{b}.{c}.{d}/29"), a1, a2);
        }
    }
    panic!("no free /29 in {SERVICE_RANGE} in the test's namespaces");
}

/// A CA and a server certificate for `ip` signed by it, with the openssl CLI.
fn make_certs(dir: &Path, ip: Ipv4Addr) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n).display().to_string();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["openssl", "req", "-x509", "-days", "2", "-subj", "/CN=berth test registry CA"];
    ca.extend(ec);
    let (ca_key, ca_pem) = (p("ca.key"), p("ca.pem"));
    ca.extend(["-keyout", &ca_key, "-out", &ca_pem]);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    sh(&ca);
    let (key, csr, crt, ext) = (p("server.key"), p("server.csr"), p("server.pem"), p("server.ext"));
    let mut req = vec!["openssl", "req", "-subj", "/CN=berth test registry"];
    req.extend(ec);
    req.extend(["-keyout", &key, "-out", &csr]);
    sh(&req);
    fs::write(
        &ext,
        format!(
            "subjectAltName=IP:{ip}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .unwrap();
    sh(&[
        "openssl",
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &crt,
        "-extfile",
        &ext,
    ]);
    for f in [&ca_pem, &crt, &key] {
        fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
    (PathBuf::from(ca_pem), PathBuf::from(crt), PathBuf::from(key))
}

fn config(dir: &Path, addr: SocketAddr, tls: Option<(&Path, &Path)>) -> String {
    let tls = tls
        .map(|(c, k)| format!("  tls:\n    certificate: {}\n    key: {}\n", c.display(), k.display()))
        .unwrap_or_default();
    format!(
        "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n  secret: berth-test-{}\n{tls}",
        dir.join("data").display(),
        std::process::id()
    )
}

/// Runs `f` with a current-thread runtime on a thread inside namespace `ns`.
pub fn in_ns_async<T, F>(ns: &str, f: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    World::in_ns(ns, move || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f()))
}

impl Registry {
    /// Starts both listeners in `w`'s world namespace and waits until they answer.
    pub fn start(w: &World) -> Registry {
        let (range, a1, a2) = pick_range(w);
        w.route_via_world(a1, &range);
        sh(&["ip", "-n", &w.world_ns, "addr", "add", &format!("{a2}/32"), "dev", "lo"]);
        w.check_route(a2);
        let dir = tempfile::Builder::new().prefix("berth-registry").tempdir().unwrap();
        let (ca, crt, key) = make_certs(dir.path(), a2);
        let (http, tls) = (SocketAddr::from((a1, HTTP_PORT)), SocketAddr::from((a2, TLS_PORT)));
        let mut r = Registry { http, tls, range, ca, ns: w.world_ns.clone(), dir, procs: Vec::new() };
        r.serve("http", config(r.dir.path(), http, None));
        r.serve("tls", config(r.dir.path(), tls, Some((&crt, &key))));
        r.wait_ready(Duration::from_secs(30));
        r
    }

    fn serve(&mut self, name: &str, config: String) {
        let cfg = self.dir.path().join(format!("{name}.yml"));
        fs::write(&cfg, config).unwrap();
        let log = fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, BINARY, "serve"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("ip netns exec {} {BINARY}: {e}", self.ns));
        self.procs.push(child);
    }

    /// What the `http` or `tls` registry logged (requests included).
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn wait_ready(&mut self, limit: Duration) {
        let started = Instant::now();
        loop {
            for c in self.procs.iter_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "{BINARY} exited ({st}); is Debian's docker-registry package installed (.ci/run installs it)?\n\
                         http: {}\ntls: {}",
                        self.log("http"),
                        self.log("tls")
                    );
                }
            }
            let (http, tls, ca) = (self.http.to_string(), self.tls.to_string(), self.ca.display().to_string());
            let ok = in_ns_async(&self.ns, move || async move {
                let plain = request("GET", &http, "/v2/", &Tls::None, &[], Vec::new()).await;
                let secure = request("GET", &tls, "/v2/", &Tls::Verify(vec![ca]), &[], Vec::new()).await;
                matches!((plain, secure), (Ok(a), Ok(b)) if a.status == 200 && b.status == 200)
            });
            if ok {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "registry not ready after {limit:?}: {}{}",
                self.log("http"),
                self.log("tls")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pushes a small image as `repo:tag` through the plain HTTP listener
    /// (both listeners serve it); returns its manifest digest.
    pub fn push(&self, repo: &str, tag: &str) -> String {
        let (host, repo, tag) = (self.http.to_string(), repo.to_string(), tag.to_string());
        in_ns_async(&self.ns, move || async move { push(&host, &repo, &tag).await })
            .unwrap_or_else(|e| panic!("push to the test registry: {e}"))
    }
}

async fn upload(host: &str, repo: &str, blob: &[u8]) -> Result<(String, usize), String> {
    let d = digest(blob);
    let start = request("POST", host, &format!("/v2/{repo}/blobs/uploads/"), &Tls::None, &[], Vec::new()).await?;
    let loc = start.headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or("");
    if start.status != 202 || loc.is_empty() {
        return Err(format!("POST blob upload: {} {}", start.status, String::from_utf8_lossy(&start.body)));
    }
    // The Location may be absolute: keep path and query.
    let path = loc.split_once("://").map(|(_, r)| &r[r.find('/').unwrap_or(r.len())..]).unwrap_or(loc);
    let sep = if path.contains('?') { '&' } else { '?' };
    let headers = [("content-type", "application/octet-stream")];
    let put = request("PUT", host, &format!("{path}{sep}digest={d}"), &Tls::None, &headers, blob.to_vec()).await?;
    if put.status != 201 {
        return Err(format!("PUT blob {d}: {} {}", put.status, String::from_utf8_lossy(&put.body)));
    }
    Ok((d, blob.len()))
}

/// Config blob, one layer, OCI manifest; returns the registry's digest of it.
async fn push(host: &str, repo: &str, tag: &str) -> Result<String, String> {
    let layer = format!("berth test layer of {repo}:{tag}, pid {}\n", std::process::id()).into_bytes();
    let (ld, ls) = upload(host, repo, &layer).await?;
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{ld}"]}},"config":{{}}}}"#
    );
    let (cd, cs) = upload(host, repo, config.as_bytes()).await?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{cs}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{ls}}}]}}"#
    );
    let mt = [("content-type", "application/vnd.oci.image.manifest.v1+json")];
    let put =
        request("PUT", host, &format!("/v2/{repo}/manifests/{tag}"), &Tls::None, &mt, manifest.clone().into_bytes())
            .await?;
    let said = put.headers.get("docker-content-digest").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if put.status != 201 || said != digest(manifest.as_bytes()) {
        return Err(format!("PUT manifest: {} digest {said:?}: {}", put.status, String::from_utf8_lossy(&put.body)));
    }
    Ok(said)
}

impl Drop for Registry {
    fn drop(&mut self) {
        for c in self.procs.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
