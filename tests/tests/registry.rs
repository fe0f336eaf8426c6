//! A real registry in the loop (issue 16): Debian's `docker-registry` runs
//! in a world namespace of the test's own (tests/src/registry.rs), and
//! fakekitd's `FetchManifest` resolves images with the registry settings of
//! the `buildkitd.toml` it was given, as buildkitd's resolver does.
//!
//! Every address lies in the test's namespaces; each route is checked before
//! the first packet, and the agent's namespace has no default route.

use berth_tests::fake_client;
use berth_tests::netfix::World;
use berth_tests::proto::fake::{FetchManifestReply, FetchManifestRequest, ReadPathRequest};
use berth_tests::registry::{Registry, SERVICE_RANGE};
use berth_tests::Agent;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FAKEKITD: &str = env!("CARGO_BIN_EXE_fakekitd");
const CLEAN: Duration = Duration::from_secs(20);

async fn fetch(socket: &Path, reference: &str, mirrors_only: bool) -> FetchManifestReply {
    let mut c = fake_client(socket).await;
    let req = FetchManifestRequest { reference: reference.into(), mirrors_only, timeout_ms: 10_000 };
    c.fetch_manifest(req).await.expect("Fake.FetchManifest").into_inner()
}

/// fakekitd alone in the agent's namespace, with `--config <toml>`.
struct Kitd {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Kitd {
    async fn start(netns: &str, toml: &str) -> Kitd {
        let dir = tempfile::tempdir().unwrap();
        let (socket, config) = (dir.path().join("kitd.sock"), dir.path().join("buildkitd.toml"));
        std::fs::write(&config, toml).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", netns, FAKEKITD])
            .arg(format!("--addr=unix://{}", socket.display()))
            .arg(format!("--root={}", dir.path().join("root").display()))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !socket.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "fakekitd did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Kitd { child, socket, _dir: dir }
    }
}

impl Drop for Kitd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakekitd_resolves_docker_io_through_the_configured_mirror() {
    let w = World::new("regk");
    let reg = Registry::start(&w);
    let want = reg.push("library/busybox", "latest");
    let other = reg.push("mirror-probe/x", "1");
    assert_ne!(want, other);

    let conf =
        format!("[registry.\"docker.io\"]\nmirrors = [\"{}\"]\n[registry.\"{}\"]\nhttp = true\n", reg.http, reg.http);
    let k = Kitd::start(&w.agent_ns, &conf).await;
    let r = fetch(&k.socket, "busybox", true).await;
    assert_eq!(r.error, "", "{r:?}");
    assert_eq!(
        (r.digest.as_str(), r.host.as_str(), r.scheme.as_str()),
        (want.as_str(), &*reg.http.to_string(), "http")
    );
    assert!(reg.log("http").contains("/v2/library/busybox/manifests/latest"), "{}", reg.log("http"));

    // Over TLS with the test CA; without it, buildkitd's x509 error.
    let tls = reg.tls.to_string();
    let with_ca = format!("[registry.\"{tls}\"]\nca = [\"{}\"]\n", reg.ca.display());
    let k = Kitd::start(&w.agent_ns, &with_ca).await;
    let r = fetch(&k.socket, &format!("{tls}/mirror-probe/x:1"), false).await;
    assert_eq!((r.error.as_str(), r.digest.as_str(), r.scheme.as_str()), ("", other.as_str(), "https"), "{r:?}");
    let k = Kitd::start(&w.agent_ns, "").await;
    let r = fetch(&k.socket, &format!("{tls}/mirror-probe/x:1"), false).await;
    assert!(r.error.contains("x509: certificate signed by unknown authority"), "{r:?}");
}

/// An agent in `w`'s agent namespace with `fragment` as `--buildkitd-config`
/// (none when empty), the registry's range denied as a service range would
/// be and opened with `--build-egress-allow`, as an operator would for an
/// in-cluster registry.
async fn agent_with(w: &World, reg: &Registry, name: &str, fragment: &str) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Agent::builder(name).netns(&w.agent_ns).args([
        "--idle-timeout",
        "1s",
        "--build-egress-deny",
        SERVICE_RANGE,
        "--build-egress-allow",
        &reg.range,
    ]);
    if !fragment.is_empty() {
        let f = dir.path().join("buildkitd.toml");
        std::fs::write(&f, fragment).unwrap();
        b = b.arg("--buildkitd-config").arg(&f);
    }
    (b.start_async().await, dir)
}

async fn done(agent: Agent) {
    let left = agent.wait_clean_async(CLEAN).await;
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_io_mirror_in_the_fragment_serves_from_busybox_through_the_instance() {
    let w = World::new("regm");
    let reg = Registry::start(&w);
    let want = reg.push("library/busybox", "latest");
    let mirror = reg.http.to_string();
    let fragment =
        format!("[registry.\"docker.io\"]\nmirrors = [\"{mirror}\"]\n\n[registry.\"{mirror}\"]\nhttp = true\n");

    let (agent, _f) = agent_with(&w, &reg, "reg-mirror", &fragment).await;
    let r = fetch(agent.socket(), "docker.io/library/busybox:latest", true).await;
    assert_eq!(r.error, "", "{r:?}");
    assert_eq!((r.digest.as_str(), r.host.as_str(), r.scheme.as_str()), (want.as_str(), mirror.as_str(), "http"));
    assert!(r.config.starts_with(&agent.state_dir().display().to_string()), "the instance's own config: {r:?}");
    // The mirror saw the request, from the agent's address (the build's NAT).
    let log = reg.log("http");
    let line = log
        .lines()
        .find(|l| l.contains("GET /v2/library/busybox/manifests/latest?ns=docker.io "))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.starts_with(&w.agent_addr.to_string()), "{line}");
    done(agent).await;

    // Without the fragment, docker.io has no mirror: nothing to fetch from.
    let (agent, _f) = agent_with(&w, &reg, "reg-nomirror", "").await;
    let r = fetch(agent.socket(), "busybox", true).await;
    assert!(r.digest.is_empty() && r.error.contains("no mirror configured for docker.io"), "{r:?}");
    done(agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_registry_over_tls_is_trusted_through_the_ca_of_the_fragment() {
    let w = World::new("regt");
    let reg = Registry::start(&w);
    let want = reg.push("mirror-probe/x", "1");
    let (tls, image) = (reg.tls.to_string(), format!("{}/mirror-probe/x:1", reg.tls));

    let with_ca = format!("[registry.\"{tls}\"]\nca = [\"{}\"]\n", reg.ca.display());
    let (agent, _f) = agent_with(&w, &reg, "reg-ca", &with_ca).await;
    let r = fetch(agent.socket(), &image, false).await;
    assert_eq!((r.error.as_str(), r.digest.as_str(), r.scheme.as_str()), ("", want.as_str(), "https"), "{r:?}");
    assert!(reg.log("tls").contains("GET /v2/mirror-probe/x/manifests/1"), "{}", reg.log("tls"));
    // What the daemon trusted is its own copy of the CA, not the operator's file.
    let mut c = fake_client(agent.socket()).await;
    let conf = c.read_path(ReadPathRequest { path: r.config.clone(), max_bytes: 0 }).await.unwrap().into_inner();
    let conf = String::from_utf8_lossy(&conf.data).into_owned();
    let instance = Path::new(&r.config).parent().unwrap().display().to_string();
    assert!(conf.contains(&format!("ca = [\"{instance}/")) && !conf.contains(&reg.ca.display().to_string()), "{conf}");
    drop(c);
    done(agent).await;

    // The same registry without its CA: buildkitd's x509 error.
    let (agent, _f) = agent_with(&w, &reg, "reg-noca", &format!("[registry.\"{tls}\"]\nhttp = false\n")).await;
    let r = fetch(agent.socket(), &image, false).await;
    assert!(r.digest.is_empty() && r.error.contains("x509: certificate signed by unknown authority"), "{r:?}");
    done(agent).await;
}
