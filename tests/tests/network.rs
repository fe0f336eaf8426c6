//! Each build gets its own network (`--build-network isolated`, the default).
//!
//! Every test builds a world of its own: the agent runs in a network
//! namespace the test made (loopback plus one veth to a "world" namespace,
//! no default route), and every server a build may or may not reach lives
//! in the world namespace, including the metadata stand-in on
//! 169.254.169.254. Routes are checked before the first packet: nothing a
//! build sends can leave the machine, even if berth failed to block it.

use berth_tests::grpc::fake_client;
use berth_tests::netfix::{inner_addr, sh, Server, World};
use berth_tests::proto::fake::fake_client::FakeClient;
use berth_tests::proto::fake::{
    BindRequest, ConnectReply, ConnectRequest, PingRequest, ReadPathRequest, ResolveRequest,
};
use berth_tests::Agent;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::transport::Channel;

const CLEAN: Duration = Duration::from_secs(20);

async fn dial(c: &mut FakeClient<Channel>, addr: &str) -> ConnectReply {
    let req = ConnectRequest {
        address: addr.into(),
        send: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        timeout_ms: 4000,
        discard: false,
        source: String::new(),
    };
    c.dial(req).await.expect("Fake.Dial").into_inner()
}

fn received(r: &ConnectReply) -> String {
    String::from_utf8_lossy(&r.received).into_owned()
}

fn assert_refused(r: &ConnectReply, what: &str) {
    assert_eq!(r.result, "refused", "{what}: expected an immediate refusal, got {r:?}");
}

/// A server on the agent's own network namespace, on every address (so
/// only the firewall keeps builds from it).
fn agent_server(w: &World) -> Server {
    World::http_server(&w.agent_ns, Ipv4Addr::UNSPECIFIED, 9099, "agent-private")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_reaches_the_world_by_nat_and_nothing_of_the_node() {
    let w = World::new("iso");
    let world = World::http_server(&w.world_ns, w.world_addr, 8080, "hello-from-world");
    let metadata_ip = Ipv4Addr::new(169, 254, 169, 254);
    w.route_via_world(metadata_ip, "169.254.169.254/32");
    let metadata = World::http_server(&w.world_ns, metadata_ip, 80, "credentials");
    let private = agent_server(&w);
    let agent = Agent::builder("net-iso")
        .netns(&w.agent_ns)
        .args(["--scope", "connection", "--max-builds", "2"])
        .start_async()
        .await;

    let mut a = fake_client(agent.socket()).await;
    let ping = a.ping(PingRequest {}).await.unwrap().into_inner();
    let a_addr = inner_addr(&mut a).await;
    assert!(agent.net().subnet.parse::<ipnet::Ipv4Net>().unwrap().contains(&a_addr), "{a_addr}");
    assert_ne!(ping.ns_net, std::fs::read_link("/proc/self/ns/net").unwrap().to_string_lossy());

    // The world, through NAT: the server sees the agent's address.
    let r = dial(&mut a, &world.addr.to_string()).await;
    assert_eq!(r.result, "ok", "{r:?}");
    assert!(received(&r).contains("hello-from-world"), "{r:?}");
    assert_eq!(world.peers.lock().unwrap().last().map(|p| p.ip()), Some(w.agent_addr.into()), "not masqueraded");

    // Metadata: refused at once, and the stand-in never saw a connection.
    w.check_route(metadata_ip);
    assert_refused(&dial(&mut a, "169.254.169.254:80").await, "metadata endpoint");
    assert_eq!(metadata.hits.load(Ordering::SeqCst), 0);

    // The agent's loopback is not the build's, and every address of the
    // agent's namespace is refused: its world-facing one, its veth end.
    let host_end = Ipv4Addr::from(u32::from(a_addr) - 1);
    for addr in ["127.0.0.1:9099".to_string(), format!("{}:9099", w.agent_addr), format!("{host_end}:9099")] {
        assert_refused(&dial(&mut a, &addr).await, &format!("agent address {addr}"));
    }
    assert_eq!(private.hits.load(Ordering::SeqCst), 0, "a build reached the agent's server");

    // Another live instance: it serves a port its own build reaches, which
    // the first instance is refused.
    let mut b = fake_client(agent.socket()).await;
    let bound = b.bind(BindRequest { port: 8081, hold_ms: 30_000 }).await.unwrap().into_inner();
    assert_eq!(bound.error, "", "{bound:?}");
    let b_addr = inner_addr(&mut b).await;
    assert_ne!(a_addr, b_addr);
    let own = dial(&mut b, &format!("{b_addr}:8081")).await;
    assert!(own.result == "ok" && received(&own).contains("bound"), "{own:?}");
    assert_refused(&dial(&mut a, &format!("{b_addr}:8081")).await, "another instance");

    // Root of its own network namespace: ports below 1024 are its to bind.
    let r = a.bind(BindRequest { port: 80, hold_ms: 0 }).await.unwrap().into_inner();
    assert_eq!(r.error, "", "bind 80 inside the instance: {r:?}");

    drop((a, b));
    let left = agent.wait_clean_async(CLEAN).await;
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_through_a_resolver_in_a_denied_range_on_port_53_only() {
    let w = World::new("dns");
    let dns_ip = Ipv4Addr::new(10, 77, 0, 53);
    w.route_via_world(dns_ip, "10.77.0.0/16");
    let queries = World::dns_server(&w.world_ns, dns_ip, "world.test", w.world_addr);
    let other_port = World::http_server(&w.world_ns, dns_ip, 80, "not-dns");
    let tmp = tempfile::tempdir().unwrap();
    let resolv = tmp.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver 127.0.0.53\nnameserver {dns_ip}\noptions timeout:1\n")).unwrap();
    let agent = Agent::builder("net-dns")
        .netns(&w.agent_ns)
        .args(["--idle-timeout", "1s", "--build-egress-deny", "10.77.0.0/16", "--build-resolv-conf"])
        .arg(&resolv)
        .start_async()
        .await;

    let mut c = fake_client(agent.socket()).await;
    let conf =
        c.read_path(ReadPathRequest { path: "/etc/resolv.conf".into(), max_bytes: 0 }).await.unwrap().into_inner();
    let conf = String::from_utf8_lossy(&conf.data).into_owned();
    assert!(conf.contains(&format!("nameserver {dns_ip}")) && !conf.contains("127.0.0.53"), "{conf}");
    assert!(conf.contains("options timeout:1"), "{conf}");

    let r = c.resolve(ResolveRequest { name: "world.test".into() }).await.unwrap().into_inner();
    assert_eq!(r.addresses, vec![w.world_addr.to_string()], "{r:?}");
    assert!(queries.load(Ordering::SeqCst) > 0);
    // The resolver's range stays denied for anything but DNS.
    w.check_route(dns_ip);
    assert_refused(&dial(&mut c, &format!("{dns_ip}:80")).await, "the resolver's address on port 80");
    assert_eq!(other_port.hits.load(Ordering::SeqCst), 0);

    drop(c);
    let left = agent.wait_clean_async(CLEAN).await;
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_allow_opens_a_denied_range_and_deny_closes_an_allowed_one() {
    let w = World::new("acl");
    let (open, closed) = (Ipv4Addr::new(10, 78, 0, 80), Ipv4Addr::new(10, 78, 0, 81));
    w.route_via_world(open, "10.78.0.0/16");
    sh(&["ip", "-n", &w.world_ns, "addr", "add", "10.78.0.81/32", "dev", "lo"]);
    w.check_route(closed);
    World::http_server(&w.world_ns, open, 80, "mirror");
    World::http_server(&w.world_ns, closed, 80, "other");
    let world = World::http_server(&w.world_ns, w.world_addr, 8080, "world");

    let agent = Agent::builder("net-allow")
        .netns(&w.agent_ns)
        .args(["--build-egress-deny", "10.78.0.0/16", "--build-egress-allow", "10.78.0.80/32"])
        .start_async()
        .await;
    let mut c = fake_client(agent.socket()).await;
    let r = dial(&mut c, &format!("{open}:80")).await;
    assert!(r.result == "ok" && received(&r).contains("mirror"), "allowed hole: {r:?}");
    assert_refused(&dial(&mut c, &format!("{closed}:80")).await, "rest of the denied range");
    assert_eq!(dial(&mut c, &world.addr.to_string()).await.result, "ok");
    drop(c);
    drop(agent);

    let agent = Agent::builder("net-deny")
        .netns(&w.agent_ns)
        .args(["--build-egress-deny", &format!("{}/32", w.world_addr)])
        .start_async()
        .await;
    let mut c = fake_client(agent.socket()).await;
    let before = world.hits.load(Ordering::SeqCst);
    assert_refused(&dial(&mut c, &world.addr.to_string()).await, "--build-egress-deny of the world server");
    assert_eq!(world.hits.load(Ordering::SeqCst), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_shim_sigkill_then_restart_leave_no_network_behind() {
    let w = World::new("kill");
    let agent = Agent::builder("net-kill").netns(&w.agent_ns).start_async().await;
    let mut c = fake_client(agent.socket()).await;
    c.ping(PingRequest {}).await.unwrap();
    let id = std::fs::read_dir(agent.state_dir().join("instances"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .expect("an instance dir");
    let shim = std::fs::read_to_string(agent.state_dir().join("instances").join(&id).join("shim.pid")).unwrap();
    let shim: i32 = shim.split_whitespace().next().unwrap().parse().unwrap();
    assert!(!agent.leak_scan().is_empty(), "a live instance must show in the scan (or the scan sees nothing)");

    // A crash can also leave a veth of ours and a lease of a dead agent
    // with no instance dir: the sweep finds them by name.
    let prefix = agent.net().prefix();
    let stray = format!("{prefix}deadbeef0");
    sh(&["ip", "-n", &w.agent_ns, "link", "add", &stray, "type", "veth", "peer", "name", "strayp"]);
    let lease = agent.state_dir().join("net-leases").join("10.255.255.252");
    std::fs::write(&lease, "deadbeef0123 agent-that-died").unwrap();
    // The live instance's element, and a stray one of a dead instance.
    let table = agent.net().table.clone();
    let set = || sh(&["ip", "netns", "exec", &w.agent_ns, "nft", "list", "set", "inet", &table, "builds"]);
    assert!(set().contains(&format!(". \"{prefix}{}", &id[..4])), "no element for {id}: {}", set());
    let stray_elem = format!("{{ 10.255.255.254 . \"{stray}\" }}");
    sh(&["ip", "netns", "exec", &w.agent_ns, "nft", "add", "element", "inet", &table, "builds", &stray_elem]);

    agent.sigkill();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::Signal::SIGKILL);
    drop(c);
    agent.restart_async().await;
    let left = agent.wait_clean_async(CLEAN).await;
    assert!(left.is_empty(), "left behind after SIGKILL + restart: {left:#?}");
    assert!(!sh(&["ip", "-n", &w.agent_ns, "-o", "link"]).contains(&stray));
    assert!(!lease.exists());
    assert!(!set().contains(&prefix), "elements left after the sweep: {}", set());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_none_behave_as_before() {
    let w = World::new("modes");
    let world = World::http_server(&w.world_ns, w.world_addr, 8080, "world");
    let private = agent_server(&w);

    // host: the node's network, its loopback included (what isolated stops).
    let agent = Agent::builder("net-host").netns(&w.agent_ns).args(["--build-network", "host"]).start_async().await;
    let mut c = fake_client(agent.socket()).await;
    let r = dial(&mut c, "127.0.0.1:9099").await;
    assert!(r.result == "ok" && received(&r).contains("agent-private"), "{r:?}");
    assert_eq!(dial(&mut c, &world.addr.to_string()).await.result, "ok");
    assert!(private.hits.load(Ordering::SeqCst) > 0);
    drop(c);
    drop(agent);

    // none: loopback only; the node's resolv.conf is left as it is.
    let agent = Agent::builder("net-none").netns(&w.agent_ns).args(["--build-network", "none"]).start_async().await;
    let mut c = fake_client(agent.socket()).await;
    let r = dial(&mut c, &world.addr.to_string()).await;
    assert_ne!(r.result, "ok", "{r:?}");
    let r = c.bind(BindRequest { port: 80, hold_ms: 0 }).await.unwrap().into_inner();
    assert_eq!(r.error, "");
    let hosts = c.read_path(ReadPathRequest { path: "/etc/hosts".into(), max_bytes: 0 }).await.unwrap().into_inner();
    assert_eq!(hosts.data, std::fs::read("/etc/hosts").unwrap_or_default());
}
