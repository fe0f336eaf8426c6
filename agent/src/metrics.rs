//! Prometheus metrics, named `berth_*`. Labels are bounded: the end reason
//! and the byte direction, never a pod or instance name (those go in the
//! per-instance log line).

use crate::phase::EndReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViaLabel {
    pub via: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: String,
}

// bkconfig (issue 16): the operator's buildkitd.toml fragment.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HashLabel {
    pub sha256: String,
}

pub struct Metrics {
    registry: Registry,
    pub slots_total: Gauge,
    pub slots_in_use: Gauge,
    pub queue_depth: Gauge,
    pub instances_active: Gauge,
    pub start_seconds: Histogram,
    pub build_seconds: Histogram,
    pub peak_memory_bytes: Histogram,
    pub peak_disk_bytes: Histogram,
    pub ended: Family<ReasonLabel, Counter>,
    pub proxied_bytes: Family<DirectionLabel, Counter>,
    pub refused: Family<ReasonLabel, Counter>,
    /// Limit hits inside running instances, by limit (memory, pids, disk).
    pub limit_hits: Family<ReasonLabel, Counter>,
    /// Instances found ready, by the path that told first (notify, probe).
    pub ready: Family<ViaLabel, Counter>,
    /// 1 while kubelet has acknowledged the CSI driver's registration.
    pub kubelet_registered: Gauge,
    /// Kubernetes Events about pods' instances, by result (see `reap::post`).
    pub events: Family<ResultLabel, Counter>,
    /// bkconfig: reloads of --buildkitd-config, by result (ok, refused).
    pub buildkitd_config_reloads: Family<ResultLabel, Counter>,
    /// bkconfig: 1 for the sha256 of the fragment in force.
    pub buildkitd_config_info: Family<HashLabel, Gauge>,
    /// The isolated build network's (see `network::metrics`).
    pub network: crate::network::metrics::NetMetrics,
    /// Failed counts of the connections on handed-off pod sockets, by
    /// reason (`handoff::netns::CountError::metric_label`).
    pub handoff_count_failures: Family<ReasonLabel, Counter>,
    /// Handed-off instances whose last count failed (kept as in use).
    pub handoff_uncounted: Gauge,
    /// Warm instances claimed by a client, by stage (daemon, sandbox).
    pub warm_claims: Family<StageLabel, Counter>,
    /// A claimed sandbox: from its go to a daemon that answers.
    pub sandbox_start_seconds: Histogram,
}

/// The reasons of `handoff_count_failures` (every label of
/// `handoff::netns::CountError`), pre-created so they read 0 before the first.
pub const HANDOFF_COUNT_REASONS: [&str; 6] =
    ["listener", "sock_diag", "daemon_fds", "pidfd_getfd", "netns", "internal"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("berth");
        let m = Metrics {
            slots_total: Gauge::default(),
            slots_in_use: Gauge::default(),
            queue_depth: Gauge::default(),
            instances_active: Gauge::default(),
            // 5 ms .. ~80 s
            start_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            // 1 s .. ~9 h
            build_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            // 16 MiB .. 64 GiB
            peak_memory_bytes: Histogram::new(exponential_buckets(16.0 * 1024.0 * 1024.0, 2.0, 13)),
            // 1 MiB .. 64 GiB
            peak_disk_bytes: Histogram::new(exponential_buckets(1024.0 * 1024.0, 2.0, 17)),
            ended: Family::default(),
            proxied_bytes: Family::default(),
            refused: Family::default(),
            limit_hits: Family::default(),
            kubelet_registered: Gauge::default(),
            events: Family::default(),
            buildkitd_config_reloads: Family::default(),
            buildkitd_config_info: Family::default(),
            network: Default::default(),
            ready: Family::default(),
            handoff_count_failures: Family::default(),
            handoff_uncounted: Gauge::default(),
            warm_claims: Family::default(),
            // 0.5 ms .. ~8 s
            sandbox_start_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            registry: Registry::default(),
        };
        registry.register("slots", "Build slots on this node", m.slots_total.clone());
        registry.register("slots_in_use", "Build slots held by an instance", m.slots_in_use.clone());
        registry.register("queue_depth", "Clients waiting for a slot", m.queue_depth.clone());
        registry.register("instances_active", "Instances started and not yet wiped", m.instances_active.clone());
        registry.register(
            "instance_start_seconds",
            "From first connection to a daemon that answers",
            m.start_seconds.clone(),
        );
        registry.register("build_duration_seconds", "Life of an instance, start to wipe", m.build_seconds.clone());
        registry.register(
            "instance_peak_memory_bytes",
            "Peak memory of an instance's cgroup",
            m.peak_memory_bytes.clone(),
        );
        registry.register(
            "instance_peak_disk_bytes",
            "Peak usage of an instance's filesystem (statfs, sampled)",
            m.peak_disk_bytes.clone(),
        );
        registry.register("instances_ended", "Instances ended, by reason", m.ended.clone());
        registry.register("proxied_bytes", "Bytes proxied between clients and instances", m.proxied_bytes.clone());
        registry.register("connections_refused", "Connections refused, by reason", m.refused.clone());
        registry.register(
            "limit_hits",
            "OOM kills, refused forks and full disks inside running instances, by limit",
            m.limit_hits.clone(),
        );
        registry.register(
            "kubelet_registered",
            "1 while kubelet has acknowledged the CSI driver registration (--registration-dir)",
            m.kubelet_registered.clone(),
        );
        registry.register(
            "events",
            "Kubernetes Events on pods whose instance ended: posted, failed (API refused or unreachable after retries), dropped (queue full, no API access, shutdown)",
            m.events.clone(),
        );
        for r in ["posted", "failed", "dropped"] {
            let _ = m.events.get_or_create(&ResultLabel { result: r.into() });
        }
        registry.register(
            "buildkitd_config_reloads",
            "Reloads of --buildkitd-config (SIGHUP or file change), by result: ok, refused (the old one stays)",
            m.buildkitd_config_reloads.clone(),
        );
        registry.register(
            "buildkitd_config_info",
            "1 for the sha256 of the --buildkitd-config fragment new instances get",
            m.buildkitd_config_info.clone(),
        );
        for r in ["ok", "refused"] {
            let _ = m.buildkitd_config_reloads.get_or_create(&ResultLabel { result: r.into() });
        }
        registry.register(
            "instance_ready",
            "Instances found ready, by the path that told first: the daemon's READY=1 (notify) or the gRPC probe",
            m.ready.clone(),
        );
        for v in ["notify", "probe"] {
            let _ = m.ready.get_or_create(&ViaLabel { via: v.into() });
        }
        registry.register(
            "handoff_count_failures",
            "Failed counts of the daemon's connections on handed-off pod sockets (every 250 ms per instance while failing; the instance is then kept as in use), by reason",
            m.handoff_count_failures.clone(),
        );
        for r in HANDOFF_COUNT_REASONS {
            let _ = m.handoff_count_failures.get_or_create(&ReasonLabel { reason: r.into() });
        }
        registry.register(
            "handoff_uncounted_instances",
            "Handed-off pod instances whose last connection count failed: not reaped when idle, ended when the pod's volume is unpublished",
            m.handoff_uncounted.clone(),
        );
        registry.register("warm_claims", "Warm instances claimed by a client, by stage", m.warm_claims.clone());
        registry.register(
            "sandbox_start_seconds",
            "A claimed warm sandbox: from its go to a daemon that answers",
            m.sandbox_start_seconds.clone(),
        );
        for s in ["daemon", "sandbox"] {
            let _ = m.warm_claims.get_or_create(&StageLabel { stage: s.into() });
        }
        for l in ["memory", "pids", "disk"] {
            let _ = m.limit_hits.get_or_create(&ReasonLabel { reason: l.into() });
        }
        for r in EndReason::ALL {
            let _ = m.ended.get_or_create(&ReasonLabel { reason: r.as_str().into() });
        }
        for d in ["up", "down"] {
            let _ = m.proxied_bytes.get_or_create(&DirectionLabel { direction: d.into() });
        }
        let network = crate::network::metrics::NetMetrics::register(&mut registry);
        Metrics { registry, network, ..m }
    }

    /// End reasons are an enum, so the label set stays bounded.
    pub fn ended(&self, reason: EndReason) {
        self.ended.get_or_create(&ReasonLabel { reason: reason.as_str().into() }).inc();
    }

    /// `result`: posted, failed or dropped.
    pub fn event(&self, result: &str) {
        self.events.get_or_create(&ResultLabel { result: result.into() }).inc();
    }

    pub fn refused(&self, reason: &str) {
        self.refused.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }

    pub fn proxied(&self, up: u64, down: u64) {
        self.proxied_bytes.get_or_create(&DirectionLabel { direction: "up".into() }).inc_by(up);
        self.proxied_bytes.get_or_create(&DirectionLabel { direction: "down".into() }).inc_by(down);
    }

    /// `reason`: one of [`HANDOFF_COUNT_REASONS`].
    pub fn handoff_count_failed(&self, reason: &'static str) {
        self.handoff_count_failures.get_or_create(&ReasonLabel { reason: reason.into() }).inc();
    }

    /// `via` is "notify" or "probe" (a bounded label).
    pub fn ready(&self, via: &'static str) {
        self.ready.get_or_create(&ViaLabel { via: via.into() }).inc();
    }

    /// `stage` is "daemon" or "sandbox" (a bounded label).
    pub fn warm_claimed(&self, stage: &'static str) {
        self.warm_claims.get_or_create(&StageLabel { stage: stage.into() }).inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("metrics encode");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_moves() {
        let m = Metrics::new();
        m.slots_total.set(4);
        m.ended(EndReason::Oom);
        m.proxied(10, 20);
        m.start_seconds.observe(0.2);
        m.ready("notify");
        let text = m.encode();
        assert!(text.contains("berth_slots 4"), "{text}");
        assert!(text.contains("berth_instances_ended_total{reason=\"oom\"} 1"), "{text}");
        assert!(text.contains("berth_instances_ended_total{reason=\"idle\"} 0"), "{text}");
        assert!(text.contains("berth_proxied_bytes_total{direction=\"down\"} 20"), "{text}");
        assert!(text.contains("berth_instance_start_seconds_count 1"), "{text}");
        assert!(text.contains("berth_instance_ready_total{via=\"notify\"} 1"), "{text}");
        assert!(text.contains("berth_instance_ready_total{via=\"probe\"} 0"), "{text}");
        assert!(text.contains("berth_warm_claims_total{stage=\"sandbox\"} 0"), "{text}");
        m.warm_claimed("sandbox");
        m.sandbox_start_seconds.observe(0.002);
        let text = m.encode();
        assert!(text.contains("berth_warm_claims_total{stage=\"sandbox\"} 1"), "{text}");
        assert!(text.contains("berth_warm_claims_total{stage=\"daemon\"} 0"), "{text}");
        assert!(text.contains("berth_sandbox_start_seconds_count 1"), "{text}");
        m.handoff_count_failed("daemon_fds");
        let text = m.encode();
        assert!(text.contains("berth_handoff_count_failures_total{reason=\"daemon_fds\"} 1"), "{text}");
        assert!(text.contains("berth_handoff_count_failures_total{reason=\"sock_diag\"} 0"), "{text}");
        assert!(text.contains("berth_handoff_uncounted_instances 0"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
