//! What a build resolves names with: the resolvers of the agent's
//! resolv.conf that its namespace can reach. Loopback resolvers (systemd's
//! 127.0.0.53, a node-local cache on 127.0.0.1) are the build's own
//! loopback inside its namespace, and IPv6 ones have no route there: both
//! are dropped, with a warning at start. Hand-written: a resolv.conf is a few
//! `keyword value` lines, and only `nameserver`, `search`, `domain` and
//! `options` matter here.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

#[derive(Debug, Default, Clone)]
pub struct Resolvers {
    pub nameservers: Vec<Ipv4Addr>,
    /// Resolvers the build cannot use, for the warning.
    pub dropped: Vec<String>,
    /// `search`, `domain` and `options` lines, kept as they are.
    pub other: Vec<String>,
}

impl Resolvers {
    /// Reads `path`; a missing or unreadable file gives no resolvers.
    pub fn read(path: &Path) -> Resolvers {
        Resolvers::parse(&std::fs::read_to_string(path).unwrap_or_default())
    }

    pub fn parse(text: &str) -> Resolvers {
        let mut r = Resolvers::default();
        for line in text.lines() {
            let mut w = line.split_whitespace();
            match w.next() {
                Some("nameserver") => match w.next().map(|a| a.split('%').next().unwrap_or(a).parse::<IpAddr>()) {
                    Some(Ok(IpAddr::V4(a))) if !a.is_loopback() && !a.is_unspecified() => {
                        if !r.nameservers.contains(&a) {
                            r.nameservers.push(a)
                        }
                    }
                    Some(_) => r.dropped.push(line.trim().to_string()),
                    None => {}
                },
                Some("search" | "domain" | "options") => r.other.push(line.trim().to_string()),
                _ => {}
            }
        }
        r
    }

    /// The instance's resolv.conf.
    pub fn render(&self) -> String {
        let mut s = String::from("# written by berth: the agent's resolvers the build can reach\n");
        for n in &self.nameservers {
            s.push_str(&format!("nameserver {n}\n"));
        }
        for l in &self.other {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}

/// The instance's /etc/hosts.
pub fn hosts(hostname: &str, addr: Ipv4Addr) -> String {
    format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{addr}\t{hostname}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_v6_resolvers_are_dropped_the_rest_kept() {
        let r = Resolvers::parse(
            "# c\nnameserver 127.0.0.53\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\nnameserver 10.96.0.10\n\
             search default.svc.cluster.local svc.cluster.local\noptions ndots:5\nnameserver bogus\n",
        );
        assert_eq!(r.nameservers, vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(r.dropped.len(), 3);
        let text = r.render();
        assert!(text.contains("nameserver 10.96.0.10\n") && !text.contains("127.0.0.53"));
        assert!(text.contains("options ndots:5\n") && text.contains("search default.svc"));
        assert!(hosts("berth-x", Ipv4Addr::new(10, 0, 0, 2)).contains("10.0.0.2\tberth-x\n"));
    }
}
