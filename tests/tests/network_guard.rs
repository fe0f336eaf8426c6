//! The isolated network's guards beyond reachability (issue 12): a build
//! sends only from its own address on its own veth (the `builds` set
//! element the shim adds), IPv6 fails at once, the firewall's refusals and
//! the subnet leases show on /metrics, and `check`'s veth probe leaves no
//! link. Same world as `network.rs`: every address a build sends to lies in
//! a namespace the test made, checked before the first packet.

use berth_tests::grpc::fake_client;
use berth_tests::netfix::{inner_addr, sh, World};
use berth_tests::proto::fake::fake_client::FakeClient;
use berth_tests::proto::fake::{ConnectReply, ConnectRequest};
use berth_tests::Agent;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::transport::Channel;

const CLEAN: Duration = Duration::from_secs(20);

async fn dial_from(c: &mut FakeClient<Channel>, addr: &str, source: &str, timeout_ms: u32) -> ConnectReply {
    let req = ConnectRequest {
        address: addr.into(),
        send: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        timeout_ms,
        discard: false,
        source: source.into(),
    };
    c.dial(req).await.expect("Fake.Dial").into_inner()
}

/// `/metrics` of an agent running in namespace `ns`, as name{labels} -> value.
fn metrics(agent: &Agent, ns: &str) -> HashMap<String, f64> {
    let addr = agent.http_addr(Duration::from_secs(10)).expect("http_addr logged");
    let body = World::in_ns(ns, move || {
        let mut s = std::net::TcpStream::connect(addr).expect("connect /metrics");
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    });
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?))))
        .collect()
}

fn builds_set(w: &World, agent: &Agent) -> String {
    sh(&["ip", "netns", "exec", &w.agent_ns, "nft", "list", "set", "inet", &agent.net().table, "builds"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_sends_only_from_its_own_address_and_v6_fails_at_once() {
    let w = World::new("spoof");
    let world = World::http_server(&w.world_ns, w.world_addr, 8080, "hello-from-world");
    // A v6 stand-in: on the world link, routed from the agent's namespace.
    sh(&["ip", "-n", &w.agent_ns, "addr", "add", "fd42:b37::1/64", "dev", "toworld", "nodad"]);
    sh(&["ip", "-n", &w.world_ns, "addr", "add", "fd42:b37::2/64", "dev", "eth0", "nodad"]);
    let r = sh(&["ip", "-n", &w.agent_ns, "-6", "route", "get", "fd42:b37::2"]);
    assert!(r.contains("dev toworld"), "{r}");
    // Reverse-path filtering off in the agent's namespace (a node may have
    // it either way): the firewall's own check is what is tested.
    for k in ["all", "default"] {
        sh(&["ip", "netns", "exec", &w.agent_ns, "sysctl", "-qw", &format!("net.ipv4.conf.{k}.rp_filter=0")]);
    }
    let agent = Agent::builder("net-spoof")
        .netns(&w.agent_ns)
        .args(["--scope", "connection", "--max-builds", "2"])
        .start_async()
        .await;
    let mut a = fake_client(agent.socket()).await;
    let mut b = fake_client(agent.socket()).await;
    let (a_addr, b_addr) = (inner_addr(&mut a).await, inner_addr(&mut b).await);

    // One element per live instance: its address on a veth of this agent's.
    let set = builds_set(&w, &agent);
    let prefix = agent.net().prefix();
    for addr in [a_addr, b_addr] {
        assert!(set.contains(&format!("{addr} . \"{prefix}")), "no element for {addr} in {set}");
    }

    // From its own address (bound explicitly): through.
    let own = dial_from(&mut a, &world.addr.to_string(), &a_addr.to_string(), 4000).await;
    assert_eq!(own.result, "ok", "{own:?}");
    let hits = world.hits.load(Ordering::SeqCst);
    // SYNs that reach the world at all (a spoofed one would be answered to
    // the other instance, so the server alone would never see it).
    let syns = || {
        let out = sh(&["ip", "netns", "exec", &w.world_ns, "nft", "list", "chain", "inet", "syntap", "input"]);
        let n = out.split("packets ").nth(1).and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok());
        n.unwrap_or_else(|| panic!("no counter in {out}"))
    };
    let tap = "table inet syntap { chain input { type filter hook input priority 0; tcp dport 8080 tcp flags syn counter; }; }";
    sh(&["ip", "netns", "exec", &w.world_ns, "nft", tap]);
    let syns_before = syns();

    // From another instance's address, and from an unleased one of the
    // build subnet: the build's root may add them to its eth0, but the
    // packets are dropped at the veth (no answer, nothing reaches the world).
    let net: ipnet::Ipv4Net = agent.net().subnet.parse().unwrap();
    let free = (1..net.hosts().count() as u32 / 4)
        .map(|k| Ipv4Addr::from(u32::from(net.network()) + 4 * k + 2))
        .find(|x| *x != a_addr && *x != b_addr)
        .unwrap();
    for src in [b_addr, free] {
        let r = dial_from(&mut a, &world.addr.to_string(), &src.to_string(), 1500).await;
        assert_ne!(r.result, "ok", "spoofed source {src} got through: {r:?}");
        assert!(!r.error.contains("source"), "the probe could not use {src}: {r:?}");
    }
    assert_eq!(world.hits.load(Ordering::SeqCst), hits, "a spoofed connection reached the world");
    assert_eq!(syns(), syns_before, "a spoofed SYN reached the world");
    assert_eq!(dial_from(&mut a, &world.addr.to_string(), "", 4000).await.result, "ok");
    assert!(syns() > syns_before, "the SYN tap counts nothing");

    // IPv6: no address or route inside, so a connect fails at once (not a
    // timeout), even to a v6 address the agent's namespace can reach.
    let v6 = dial_from(&mut a, "[fd42:b37::2]:8080", "", 4000).await;
    assert_eq!(v6.result, "refused", "IPv6 must fail at once: {v6:?}");

    // The agent's loopback: refused, and counted with the spoofed packets.
    let r = dial_from(&mut a, "127.0.0.1:9", "", 4000).await;
    assert_eq!(r.result, "refused", "{r:?}");
    let m = metrics(&agent, &w.agent_ns);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("{k} not in /metrics: {m:?}"));
    assert!(get("berth_network_refused_packets_total{class=\"spoofed\"}") >= 2.0, "{m:?}");
    assert_eq!(get("berth_network_leases"), 2.0);
    assert_eq!(get("berth_network_subnets"), 64.0);
    assert_eq!(get("berth_network_setup_failures_total{reason=\"netlink\"}"), 0.0);

    drop((a, b));
    let left = agent.wait_clean_async(CLEAN).await;
    assert!(left.is_empty(), "left behind: {left:#?}");
    assert!(!builds_set(&w, &agent).contains(&prefix), "elements left: {}", builds_set(&w, &agent));
    assert_eq!(metrics(&agent, &w.agent_ns).get("berth_network_leases"), Some(&0.0));
}

#[test]
fn check_probes_veths_and_leaves_no_link() {
    let w = World::new("chk");
    let state = tempfile::Builder::new().prefix("berth-netcheck-").tempdir().unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &w.agent_ns])
        .arg(berth_tests::bin_path("berth-agent"))
        .args(["check", "--daemon", "true", "--state-dir"])
        .arg(state.path().join("s"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("veth")).unwrap_or_else(|| panic!("no veth item: {text}"));
    assert!(line.contains("a veth pair can be created"), "{line}");
    let links = sh(&["ip", "-n", &w.agent_ns, "-o", "link"]);
    let left: Vec<&str> = links.lines().filter(|l| !l.contains(": lo:") && !l.contains(": toworld@")).collect();
    assert!(left.is_empty(), "check left links: {left:#?}");
}
