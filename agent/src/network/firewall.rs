//! berth's firewall: one nftables table (family inet, `--build-nft-table`),
//! written once at start in one atomic `nft -f` transaction: a table that
//! existed is redefined in place, never missing in between, and its
//! `builds` set keeps its elements (the live instances of this agent after
//! a restart, or of the old agent during a surge rollout).
//!
//! Surge rollouts: the new agent redefines the table with the same rules,
//! the old agent's instances keep matching them (the rules name the veths
//! by prefix), and no agent ever deletes the table on exit.
//!
//! Hand-written nft text through the `nft` binary rather than the `nftables`
//! crate: that crate also pipes to the same binary (as JSON), and the text
//! below is exactly what an operator sees in `nft list table inet berth`.
//! Per-instance elements go over netlink (`berth_shim::net::nft`).
//!
//! What a build's packets meet (`<p>` is the veth prefix):
//! - from any source but its own address on its own veth (the `builds`
//!   element the shim added): dropped, counted as `spoofed`;
//! - to the agent's own namespace (hook input: every local address,
//!   loopback, the veth's own address, node ports with hostNetwork): only
//!   DNS to the resolvers, port 53; the rest refused (`agent`);
//! - forwarded: IPv6 refused (`ipv6`); DNS to the resolvers;
//!   `--build-egress-allow`; then refused: 169.254.0.0/16 (`metadata`), the
//!   whole build subnet (`instances`), `--build-egress-deny` (`deny`); the
//!   rest accepted and masqueraded;
//! - to a build: replies only.
//!
//! Refused means a TCP reset or ICMP admin-prohibited: connect fails at once.
//! Each class has a named counter in the table (see [`COUNTERS`]), read by
//! the metrics over netlink.
#![forbid(unsafe_code)]

use berth_shim::net::nft::BUILDS_SET as BUILDS;
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Metadata endpoints and link-local: never reachable from a build.
pub const ALWAYS_DENIED: &str = "169.254.0.0/16";

/// The named counters, one per refusal class (`refused_<class>`).
pub const COUNTERS: [&str; 6] = ["metadata", "agent", "instances", "deny", "ipv6", "spoofed"];
/// Chains and sets the table defines (besides `builds`, which is kept).
const CHAINS: [&str; 7] = ["input", "build_to_agent", "forward", "build_out", "build_in", "refuse", "postrouting"];
/// `(name, type and flags)`: an `add` must match an existing set's own.
const SETS: [(&str, &str); 3] = [
    ("deny", "type ipv4_addr; flags interval;"),
    ("allow", "type ipv4_addr; flags interval;"),
    ("dns", "type ipv4_addr;"),
];

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run nft ({0}): install nftables (Debian/Ubuntu: apt-get install nftables) or use --build-network host|none")]
    NoNft(std::io::Error),
    #[error("nft -f rejected berth's table {table}: {stderr}")]
    Rejected { table: String, stderr: String },
}

#[derive(Debug, Clone)]
pub struct Rules {
    pub table: String,
    pub prefix: String,
    pub subnet: Ipv4Net,
    pub deny: Vec<Ipv4Net>,
    pub allow: Vec<Ipv4Net>,
    pub dns: Vec<Ipv4Addr>,
}

fn set(name: &str, ty: &str, interval: bool, elems: &[String]) -> String {
    let flags = if interval { " flags interval; auto-merge;" } else { "" };
    let elements = if elems.is_empty() { String::new() } else { format!(" elements = {{ {} }};", elems.join(", ")) };
    format!("  set {name} {{ type {ty};{flags}{elements} }}\n")
}

/// The whole table as an `nft -f` script: everything but the `builds`
/// set is flushed and deleted (if there) and defined anew, in one
/// transaction.
pub fn render(r: &Rules) -> String {
    let (t, p) = (&r.table, &r.prefix);
    let mut deny: Vec<String> = r.deny.iter().map(|n| n.to_string()).collect();
    if deny.is_empty() {
        // An empty interval set cannot be matched against in every nft
        // version; the metadata range is refused before it anyway.
        deny.push(ALWAYS_DENIED.to_string());
    }
    let allow: Vec<String> = r.allow.iter().map(|n| n.to_string()).collect();
    let dns: Vec<String> = r.dns.iter().map(|a| a.to_string()).collect();
    let mut s = format!("add table inet {t}\nadd set inet {t} {BUILDS} {{ type ipv4_addr . ifname; }}\n");
    for c in CHAINS {
        s += &format!("add chain inet {t} {c}\nflush chain inet {t} {c}\n");
    }
    for c in CHAINS {
        s += &format!("delete chain inet {t} {c}\n");
    }
    for (set, def) in SETS {
        s += &format!("add set inet {t} {set} {{ {def} }}\ndelete set inet {t} {set}\n");
    }
    for c in COUNTERS {
        s += &format!("add counter inet {t} refused_{c}\ndelete counter inet {t} refused_{c}\n");
    }
    s += &format!("table inet {t} {{\n");
    s += &set("deny", "ipv4_addr", true, &deny);
    s += &set("allow", "ipv4_addr", true, &allow);
    s += &set("dns", "ipv4_addr", false, &dns);
    for c in COUNTERS {
        s += &format!("  counter refused_{c} {{ }}\n");
    }
    let (meta, subnet) = (ALWAYS_DENIED, r.subnet);
    s += &format!(
        r#"  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{p}*" jump build_to_agent
  }}
  chain build_to_agent {{
    ip saddr . iifname != @{BUILDS} counter name refused_spoofed drop
    ip daddr @dns meta l4proto {{ tcp, udp }} th dport 53 accept
    counter name refused_agent jump refuse
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{p}*" jump build_out
    oifname "{p}*" jump build_in
  }}
  chain build_out {{
    meta nfproto ipv6 counter name refused_ipv6 jump refuse
    ip saddr . iifname != @{BUILDS} counter name refused_spoofed drop
    ip daddr @dns meta l4proto {{ tcp, udp }} th dport 53 accept
    ip daddr @allow accept
    ip daddr {meta} counter name refused_metadata jump refuse
    ip daddr {subnet} counter name refused_instances jump refuse
    ip daddr @deny counter name refused_deny jump refuse
    accept
  }}
  chain build_in {{
    ct state established,related accept
    jump refuse
  }}
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject with icmpx admin-prohibited
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    iifname "{p}*" oifname != "{p}*" masquerade
  }}
}}
"#
    );
    s
}

/// Runs `nft -f -` with `script`.
pub async fn apply(table: &str, script: &str) -> Result<(), FirewallError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FirewallError::NoNft)?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes()).await;
    }
    let out = child.wait_with_output().await.map_err(FirewallError::NoNft)?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(FirewallError::Rejected { table: table.to_string(), stderr })
    }
}

pub async fn install(r: &Rules) -> Result<(), FirewallError> {
    apply(&r.table, &render(r)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_denies_metadata_pool_and_flags_and_allows_dns_first() {
        let r = Rules {
            table: "berth".into(),
            prefix: "bk1234".into(),
            subnet: "10.213.0.0/16".parse().unwrap(),
            deny: vec!["10.96.0.0/12".parse().unwrap()],
            allow: vec![],
            dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
        };
        let s = render(&r);
        assert!(
            s.contains("set deny { type ipv4_addr; flags interval; auto-merge; elements = { 10.96.0.0/12 }; }"),
            "{s}"
        );
        assert!(s.contains("ip daddr 10.213.0.0/16 counter name refused_instances jump refuse"), "{s}");
        assert!(s.contains("ip daddr 169.254.0.0/16 counter name refused_metadata jump refuse"), "{s}");
        // The builds set is only ever added (kept with its elements), never deleted.
        assert!(s.contains("add set inet berth builds { type ipv4_addr . ifname; }"), "{s}");
        assert!(!s.contains("delete set inet berth builds") && !s.contains("delete table"), "{s}");
        let spoof = s.find("ip saddr . iifname != @builds").unwrap();
        assert!(spoof < s.find("ip daddr @dns").unwrap(), "spoofed sources must drop before anything passes");
        assert!(s.contains("set allow { type ipv4_addr; flags interval; auto-merge; }"), "{s}");
        assert!(s.contains("iifname \"bk1234*\" jump build_to_agent"));
        let out = s.find("ip daddr @dns").unwrap();
        assert!(out < s.find("ip daddr @deny").unwrap(), "DNS must pass before the deny list");
        assert!(s.find("ip daddr @allow").unwrap() < s.find("ip daddr @deny").unwrap());
    }

    /// Against the kernel (root, `nft`): redefining the table keeps the
    /// builds' elements and resets nothing else a running build needs.
    #[tokio::test]
    async fn a_reinstall_keeps_the_builds_elements() {
        use berth_shim::net::nft;
        let table = format!("berth_fwut{}", std::process::id());
        let r = Rules {
            table: table.clone(),
            prefix: "bkfwut".into(),
            subnet: "10.251.0.0/24".parse().unwrap(),
            deny: vec![],
            allow: vec!["10.96.0.1/32".parse().unwrap()],
            dns: vec![],
        };
        if let Err(FirewallError::NoNft(e)) = install(&r).await {
            return eprintln!("SKIPPED: no nft binary ({e}): apt-get install nftables");
        }
        let a = Ipv4Addr::new(10, 251, 0, 2);
        nft::add_build(&table, a, "bkfwut0001").unwrap();
        let again = install(&Rules { deny: vec!["10.97.0.0/16".parse().unwrap()], ..r.clone() }).await;
        let elements = nft::builds(&table);
        let counters = nft::counters(&table);
        let listed = std::process::Command::new("nft").args(["list", "table", "inet", &table]).output().unwrap();
        let _ = std::process::Command::new("nft").args(["delete", "table", "inet", &table]).output();
        again.unwrap();
        assert_eq!(elements.unwrap(), vec![(a, "bkfwut0001".to_string())]);
        assert_eq!(counters.unwrap().len(), COUNTERS.len());
        let text = String::from_utf8_lossy(&listed.stdout);
        assert!(text.contains("10.97.0.0/16") && text.matches("chain build_out").count() == 1, "{text}");
    }
}
