//! Network fixtures for the suites: a unique build subnet and nftables table
//! per test agent (so parallel agents never share addresses or rules), the
//! network part of the leak scan, and the "world": network namespaces the
//! test makes as stand-ins for everything outside the agent.
//!
//! Fixtures shell out to `ip` and `nft` (iproute2, nftables): they are the
//! tools an operator would use to look, and the code under test uses
//! netlink itself. Every address a test sends to lies inside a namespace the
//! test made: [`World::route_via_world`] checks the route before any packet.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Runs a fixture command; panics with its output when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e} (install iproute2 and nftables)"));
    if !out.status.success() {
        panic!("{args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cmd` run in network namespace `ns` (None: the test's own).
fn in_ns(ns: Option<&str>, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    if let Some(ns) = ns {
        v.extend(["ip", "netns", "exec", ns].map(String::from));
    }
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// A build subnet of its own for one test agent: a /24 of 10.200.0.0/13,
/// claimed node-wide with an O_EXCL file naming the test's pid (a claim of
/// a dead pid is taken over), released on drop.
pub struct SubnetClaim {
    pub subnet: String,
    pub table: String,
    path: PathBuf,
}

const CLAIMS: &str = "/run/berth-test-subnets";

impl SubnetClaim {
    pub fn new() -> SubnetClaim {
        fs::create_dir_all(CLAIMS).expect("claims dir");
        let me = std::process::id();
        let start = (me as usize * 7 + COUNTER.fetch_add(1, Ordering::SeqCst) * 13) % 2048;
        for i in 0..2048 {
            let n = (start + i) % 2048;
            let path = Path::new(CLAIMS).join(n.to_string());
            let take = match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => f.write_all(me.to_string().as_bytes()).is_ok(),
                Err(_) => {
                    let owner = fs::read_to_string(&path).unwrap_or_default();
                    let dead =
                        owner.trim().parse::<u32>().map(|p| !Path::new(&format!("/proc/{p}")).exists()).unwrap_or(true);
                    dead && fs::write(&path, me.to_string()).is_ok()
                }
            };
            if take {
                let subnet = format!("10.{}.{}.0/24", 200 + n / 256, n % 256);
                let table = format!("berth_t{me}_{n}");
                return SubnetClaim { subnet, table, path };
            }
        }
        panic!("no free test subnet in 10.200.0.0/13 ({CLAIMS} full)");
    }

    /// `--build-subnet` and `--build-nft-table` for the agent.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        ["--build-subnet", &self.subnet, "--build-nft-table", &self.table].iter().map(|s| s.into()).collect()
    }

    /// The host-side veth prefix the agent derives from the table name.
    pub fn prefix(&self) -> String {
        format!("bk{}", berth_agent::network::tag(&self.table))
    }
}

impl Drop for SubnetClaim {
    fn drop(&mut self) {
        // An agent in the test's own namespace left its table there.
        drop_table(None, &self.table);
        let _ = fs::remove_file(&self.path);
    }
}

/// Deletes the agent's nftables table (the agent never does: see the
/// firewall module); in `netns` when the agent ran in one.
pub fn drop_table(netns: Option<&str>, table: &str) {
    let args = in_ns(netns, &["nft", "delete", "table", "inet", table]);
    let _ = Command::new(&args[0]).args(&args[1..]).output();
}

/// What an instance's network could leave behind: subnet leases, host-side
/// veths of the agent's prefix, addresses inside its build subnet (in the
/// agent's namespace), and elements inside the build subnet in berth's
/// nftables sets other than the subnet itself.
pub fn leak_scan(state_dir: &Path, netns: Option<&str>, claim: &SubnetClaim) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(state_dir.join("net-leases")) {
        for e in rd.flatten() {
            out.push(format!("subnet lease left: {}", e.path().display()));
        }
    }
    let run = |args: &[&str]| {
        let a = in_ns(netns, args);
        Command::new(&a[0])
            .args(&a[1..])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let prefix = claim.prefix();
    for line in run(&["ip", "-o", "link"]).lines() {
        if let Some(name) = line.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n)) {
            if name.starts_with(&prefix) {
                out.push(format!("link left: {name}"));
            }
        }
    }
    let net: ipnet::Ipv4Net = claim.subnet.parse().unwrap();
    for line in run(&["ip", "-o", "-4", "addr"]).lines() {
        let addr = line.split_whitespace().nth(3).and_then(|a| a.split('/').next()).and_then(|a| a.parse().ok());
        if addr.is_some_and(|a: Ipv4Addr| net.contains(&a)) {
            out.push(format!("address left: {line}"));
        }
    }
    // The instances' elements of the builds set, by this agent's veth prefix
    // (the address scan below catches them too; this names them).
    let builds = run(&["nft", "list", "set", "inet", &claim.table, "builds"]);
    if builds.contains(&format!(". \"{prefix}")) {
        out.push(format!("nftables element left in {} set builds: {}", claim.table, builds.trim()));
    }
    let table = run(&["nft", "list", "table", "inet", &claim.table]);
    for word in table.split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}') {
        let a = word.split('/').next().unwrap_or("");
        if a.parse::<Ipv4Addr>().is_ok_and(|a| net.contains(&a)) && word != claim.subnet {
            out.push(format!("nftables element left in {}: {word}", claim.table));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The world

/// Two network namespaces of the test's own: `agent` (where the agent runs:
/// loopback and one veth to the world, no default route, so nothing the
/// agent or a build sends can leave the machine) and `world` (servers).
pub struct World {
    pub agent_ns: String,
    pub world_ns: String,
    /// The agent's address on the world link, and the world's.
    pub agent_addr: Ipv4Addr,
    pub world_addr: Ipv4Addr,
}

impl World {
    /// Makes both namespaces and the link; `tag` keeps names unique.
    pub fn new(tag: &str) -> World {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{}_{n}", tag, std::process::id());
        let (agent_ns, world_ns) = (format!("bta{id}"), format!("btw{id}"));
        sh(&["ip", "netns", "add", &agent_ns]);
        sh(&["ip", "netns", "add", &world_ns]);
        let w = World {
            agent_ns,
            world_ns,
            agent_addr: Ipv4Addr::new(198, 18, 0, 1),
            world_addr: Ipv4Addr::new(198, 18, 0, 2),
        };
        sh(&["ip", "-n", &w.agent_ns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &w.world_ns, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "-n",
            &w.agent_ns,
            "link",
            "add",
            "toworld",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &w.world_ns,
        ]);
        sh(&["ip", "-n", &w.agent_ns, "addr", "add", "198.18.0.1/30", "dev", "toworld"]);
        sh(&["ip", "-n", &w.world_ns, "addr", "add", "198.18.0.2/30", "dev", "eth0"]);
        sh(&["ip", "-n", &w.agent_ns, "link", "set", "toworld", "up"]);
        sh(&["ip", "-n", &w.world_ns, "link", "set", "eth0", "up"]);
        // Replies to the builds' masqueraded traffic come back to the agent.
        sh(&["ip", "-n", &w.world_ns, "route", "add", "default", "via", "198.18.0.1"]);
        w
    }

    /// Puts `addr` (e.g. 169.254.169.254) on the world's loopback and routes
    /// `route` (e.g. 169.254.169.254/32) to it from the agent's namespace;
    /// then checks that the agent's route to `addr` goes through the world
    /// link. Panics before any packet is sent otherwise.
    pub fn route_via_world(&self, addr: Ipv4Addr, route: &str) {
        sh(&["ip", "-n", &self.world_ns, "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        sh(&["ip", "-n", &self.agent_ns, "route", "add", route, "via", &self.world_addr.to_string()]);
        self.check_route(addr);
    }

    /// Panics unless the agent's namespace routes `addr` through the world link.
    pub fn check_route(&self, addr: Ipv4Addr) {
        let r = sh(&["ip", "-n", &self.agent_ns, "route", "get", &addr.to_string()]);
        assert!(r.contains("dev toworld"), "route to {addr} does not go to the test's world namespace: {r}");
    }

    /// Runs `f` on a thread inside namespace `ns` (sockets made there stay there).
    pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let fd = fs::File::open(&path).expect("netns file");
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }

    /// An HTTP/1.0 server in `ns` on `addr:port` answering `body` to any request.
    pub fn http_server(ns: &str, addr: Ipv4Addr, port: u16, body: &str) -> Server {
        let l = World::in_ns(ns, move || TcpListener::bind((addr, port)).expect("bind test server"));
        let hits = Arc::new(AtomicU64::new(0));
        let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, p, body) = (hits.clone(), peers.clone(), body.to_string());
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                h.fetch_add(1, Ordering::SeqCst);
                if let Ok(a) = c.peer_addr() {
                    p.lock().unwrap().push(a);
                }
                let body = body.clone();
                std::thread::spawn(move || {
                    let mut c = c;
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 1024];
                    let _ = c.read(&mut buf);
                    let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                });
            }
        });
        Server { addr: SocketAddr::from((addr, port)), hits, peers }
    }

    /// A DNS stand-in in `ns` on `addr:53` (UDP): answers A queries for
    /// `name` with `answer`, NXDOMAIN otherwise.
    pub fn dns_server(ns: &str, addr: Ipv4Addr, name: &str, answer: Ipv4Addr) -> Arc<AtomicU64> {
        let s = World::in_ns(ns, move || UdpSocket::bind((addr, 53)).expect("bind test DNS"));
        let hits = Arc::new(AtomicU64::new(0));
        let (h, name) = (hits.clone(), name.trim_end_matches('.').to_ascii_lowercase());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = s.recv_from(&mut buf) {
                h.fetch_add(1, Ordering::SeqCst);
                if let Some(reply) = dns_answer(&buf[..n], &name, answer) {
                    let _ = s.send_to(&reply, peer);
                }
            }
        });
        hits
    }
}

/// A test server and how many connections it took.
pub struct Server {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    /// Source addresses of the connections it took.
    pub peers: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

/// The answer to one DNS query (RFC 1035 wire format; just what getaddrinfo sends).
fn dns_answer(q: &[u8], name: &str, answer: Ipv4Addr) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    while i < q.len() && q[i] != 0 {
        let l = q[i] as usize;
        labels.push(String::from_utf8_lossy(q.get(i + 1..i + 1 + l)?).to_ascii_lowercase());
        i += 1 + l;
    }
    let qend = i + 5; // zero byte, qtype, qclass
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    let hit = labels.join(".") == name;
    let mut r = q[..qend.min(q.len())].to_vec();
    r[2] = 0x81; // response, recursion desired
    r[3] = if hit { 0x80 } else { 0x83 }; // recursion available; NXDOMAIN when not ours
    r[6..8].copy_from_slice(&(if hit && qtype == 1 { 1u16 } else { 0 }).to_be_bytes());
    r[8..12].copy_from_slice(&[0, 0, 0, 0]);
    if hit && qtype == 1 {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        r.extend_from_slice(&answer.octets());
    }
    Some(r)
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.agent_ns]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.world_ns]).output();
    }
}

/// An instance's address, from the /etc/hosts berth gave it (through
/// fakekitd's ReadPath).
pub async fn inner_addr(c: &mut crate::proto::fake::fake_client::FakeClient<tonic::transport::Channel>) -> Ipv4Addr {
    let req = crate::proto::fake::ReadPathRequest { path: "/etc/hosts".into(), max_bytes: 0 };
    let r = c.read_path(req).await.unwrap().into_inner();
    let text = String::from_utf8_lossy(&r.data).into_owned();
    text.lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<Ipv4Addr>().ok())
        .find(|a| !a.is_loopback())
        .unwrap_or_else(|| panic!("no instance address in its /etc/hosts: {text:?}"))
}
