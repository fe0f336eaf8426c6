//! berth's firewall: one nftables table (family inet, `--build-nft-table`),
//! written once at start in one atomic `nft -f` transaction (add, delete,
//! define: a table that existed is replaced, never missing in between).
//!
//! Surge rollouts: the new agent replaces the table with the same rules, the
//! old agent's instances keep matching them (the rules name the veths by
//! prefix, not one by one), and no agent ever deletes the table on exit.
//!
//! Hand-written nft text through the `nft` binary rather than the `nftables`
//! crate: that crate also pipes to the same binary (as JSON), and the text
//! below is exactly what an operator sees in `nft list table inet berth`.
//!
//! What a build's packets meet (`<p>` is the veth prefix):
//! - to the agent's own namespace (hook input: every local address,
//!   loopback, the veth's own address, node ports with hostNetwork): only
//!   DNS to the resolvers, port 53; the rest refused;
//! - forwarded: IPv6 refused; a source the veth cannot route back (spoofed)
//!   dropped; DNS to the resolvers; `--build-egress-allow`; then refused:
//!   169.254.0.0/16, the whole build subnet (other instances),
//!   `--build-egress-deny`; the rest accepted and masqueraded;
//! - to a build: replies only.
//!
//! Refused means a TCP reset or ICMP admin-prohibited: connect fails at once.
#![forbid(unsafe_code)]

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Metadata endpoints and link-local: never reachable from a build.
pub const ALWAYS_DENIED: &str = "169.254.0.0/16";

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

/// The whole table as an `nft -f` script.
pub fn render(r: &Rules) -> String {
    let (t, p) = (&r.table, &r.prefix);
    let mut deny = vec![ALWAYS_DENIED.to_string(), r.subnet.to_string()];
    deny.extend(r.deny.iter().map(|n| n.to_string()));
    let allow: Vec<String> = r.allow.iter().map(|n| n.to_string()).collect();
    let dns: Vec<String> = r.dns.iter().map(|a| a.to_string()).collect();
    let mut s = format!("add table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n");
    s += &set("deny", "ipv4_addr", true, &deny);
    s += &set("allow", "ipv4_addr", true, &allow);
    s += &set("dns", "ipv4_addr", false, &dns);
    s += &format!(
        r#"  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{p}*" jump build_to_agent
  }}
  chain build_to_agent {{
    ip daddr @dns meta l4proto {{ tcp, udp }} th dport 53 accept
    jump refuse
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{p}*" jump build_out
    oifname "{p}*" jump build_in
  }}
  chain build_out {{
    meta nfproto ipv6 jump refuse
    fib saddr . iif oif missing drop
    ip daddr @dns meta l4proto {{ tcp, udp }} th dport 53 accept
    ip daddr @allow accept
    ip daddr @deny jump refuse
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
        assert!(s.contains("elements = { 169.254.0.0/16, 10.213.0.0/16, 10.96.0.0/12 }"), "{s}");
        assert!(s.contains("set allow { type ipv4_addr; flags interval; auto-merge; }"), "{s}");
        assert!(s.contains("iifname \"bk1234*\" jump build_to_agent"));
        let out = s.find("ip daddr @dns").unwrap();
        assert!(out < s.find("ip daddr @deny").unwrap(), "DNS must pass before the deny list");
        assert!(s.find("ip daddr @allow").unwrap() < s.find("ip daddr @deny").unwrap());
    }
}
