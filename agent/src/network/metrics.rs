//! What a platform engineer watches of the isolated network: subnets
//! leased against the pool's size, packets the firewall refused by class
//! (the named counters of berth's table, read over netlink at each
//! scrape: one dump, about 0.05 ms in bench figure 8, so nothing is
//! cached), and setup
//! failures by reason.
#![forbid(unsafe_code)]

use super::Network;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Mutex;
use tracing::debug;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Default)]
pub struct NetMetrics {
    pub leases: Gauge,
    pub subnets: Gauge,
    pub refused: Family<ClassLabel, Counter>,
    pub setup_failures: Family<ReasonLabel, Counter>,
    /// The table's counter values at the last scrape: the exported
    /// counters move by the difference (a table redefined by a newer agent
    /// starts again from 0).
    last: Mutex<HashMap<String, u64>>,
}

/// Setup failure reasons, pre-created so they read 0 before the first.
const REASONS: [&str; 6] = ["subnet_exhausted", "subnet", "io", "netlink", "nftables", "firewall"];

impl NetMetrics {
    pub fn register(registry: &mut Registry) -> NetMetrics {
        let m = NetMetrics::default();
        registry.register("network_leases", "Build subnets (/30) leased on this state dir", m.leases.clone());
        registry.register("network_subnets", "Build subnets (/30) in --build-subnet", m.subnets.clone());
        registry.register(
            "network_refused_packets",
            "Packets of builds the firewall refused, by class (metadata, agent, instances, deny, ipv6, spoofed)",
            m.refused.clone(),
        );
        registry.register(
            "network_setup_failures",
            "Instances whose isolated network could not be set up, by reason",
            m.setup_failures.clone(),
        );
        for c in super::firewall::COUNTERS {
            let _ = m.refused.get_or_create(&ClassLabel { class: c.into() });
        }
        for r in REASONS {
            let _ = m.setup_failures.get_or_create(&ReasonLabel { reason: r.into() });
        }
        m
    }

    pub fn failed(&self, reason: &'static str) {
        self.setup_failures.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }

    /// A shim's start failure: counted when it was the network's.
    pub fn shim_failed(&self, reason: &str) {
        if let Some(rest) = reason.split("isolated network: ").nth(1) {
            self.failed(if rest.starts_with("nftables") { "nftables" } else { "netlink" });
        }
    }

    /// Reads the lease count and the firewall's counters (at a scrape).
    pub fn refresh(&self, net: &Network) {
        self.subnets.set(net.pool.capacity() as i64);
        self.leases.set(net.pool.leases().len() as i64);
        let counters = match berth_shim::net::nft::counters(&net.table) {
            Ok(c) => c,
            Err(e) => return debug!(error = %e, "cannot read the firewall's counters"),
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for (name, packets, _) in counters {
            let Some(class) = name.strip_prefix("refused_") else { continue };
            let before = last.insert(name.clone(), packets).unwrap_or(0);
            let delta = if packets >= before { packets - before } else { packets };
            self.refused.get_or_create(&ClassLabel { class: class.into() }).inc_by(delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classed_and_exported() {
        let mut r = Registry::with_prefix("berth");
        let m = NetMetrics::register(&mut r);
        m.shim_failed("shim: isolated network: nftables: add element 10.0.0.2 . \"bk\" ...: No such file");
        m.shim_failed("shim: isolated network: netlink: create veth bk1: File exists");
        m.shim_failed("daemon exited 1");
        m.failed("subnet_exhausted");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for want in [
            "berth_network_setup_failures_total{reason=\"nftables\"} 1",
            "berth_network_setup_failures_total{reason=\"netlink\"} 1",
            "berth_network_setup_failures_total{reason=\"subnet_exhausted\"} 1",
            "berth_network_setup_failures_total{reason=\"io\"} 0",
            "berth_network_refused_packets_total{class=\"metadata\"} 0",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }
}
