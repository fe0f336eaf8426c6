//! berth-agent: one fresh, rootless, limited buildkitd per build client.
//!
//! The life of a build, one module per stage:
//! `listen` (accept, identify the peer) -> `admit` (find or start the
//! client's instance through the `registry`, queue for a slot, hold the
//! connection until it is ready) -> `spawn` (lease ids, lay out the dir,
//! cgroup, start the shim, readiness) -> `proxy` (bytes both ways) -> `reap`
//! (idle, daemon exit, shutdown; the shim wipes) -> `recover` (sweep what a
//! dead agent left). `life` runs one instance through spawn and reap; `warm`
//! keeps instances started ahead.
//!
//! Shared types have homes below the stages, so imports only go down this
//! list and never in a circle (agent/tests/module_graph.rs checks):
//! `client`, `error`, `phase` -> `instance`, `shim` -> `registry`, `queue`.
//!
//! No unsafe code in the agent: its few system calls go through nix (sys.rs).
#![forbid(unsafe_code)]

pub mod admit;
pub mod bkconfig;
pub mod bounds;
pub mod capacity;
pub mod check;
pub mod client;
pub mod config;
pub mod csi;
pub mod disk;
pub mod error;
pub mod handoff;
pub mod hints;
pub mod http;
pub mod idmap;
pub mod instance;
pub mod life;
pub mod listen;
pub mod log;
pub mod metrics;
pub mod network;
pub mod notify;
pub mod owner;
pub mod phase;
pub mod probe;
pub mod proto;
pub mod proxy;
pub mod publish;
pub mod queue;
pub mod reap;
pub mod recover;
pub mod refuse;
pub mod register;
pub mod registry;
pub mod run;
pub mod shim;
pub mod spawn;
pub mod sys;
pub mod trailers;
pub mod warm;

use berth_shim::cgroup::Layout;
use config::RunArgs;
use idmap::IdPool;
use registry::Registry;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::task::TaskTracker;

/// Everything the stages share.
pub struct Ctx {
    pub run: RunArgs,
    pub node_name: String,
    pub layout: Layout,
    pub pool: IdPool,
    pub shim: PathBuf,
    /// The daemon binary, resolved against PATH.
    pub daemon: PathBuf,
    /// The daemon's PATH, on which runc was found (`spawn::tools`).
    pub daemon_path: String,
    /// Who has which instance, the warm pool and the failure cache.
    pub registry: Registry,
    /// An instance was wiped: the warm pool may refill (see warm.rs).
    pub warm_wanted: Notify,
    /// Set on the first SIGTERM: no new clients.
    pub draining: watch::Sender<bool>,
    /// Set when running instances must end now.
    pub shutdown: watch::Sender<bool>,
    pub tasks: TaskTracker,
    pub metrics: metrics::Metrics,
    /// One permit per build slot; an instance's life task holds one from
    /// spawn to wipe.
    pub slots: Arc<Semaphore>,
    pub slots_total: u64,
    /// Clients waiting for a slot.
    pub queued: AtomicUsize,
    /// Registration of the CSI driver with kubelet (`--registration-dir`).
    pub kubelet: watch::Sender<register::Kubelet>,
    /// This agent's ownership lock; instances record its id.
    pub owner: owner::Owner,
    /// Spare disk images ready for the next starts (`--build-disk` > 0).
    pub spares: Option<Arc<disk::spares::Spares>>,
    /// The isolated build network (`--build-network isolated`), else None.
    pub network: Option<network::Network>,
    /// Connections per client (hostile-client bounds, see `bounds`).
    pub bounds: bounds::Bounds,
    /// Kubernetes Events on pods whose instance ended (see `reap::post`).
    pub events: reap::post::Events,
    /// bkconfig (issue 16): the operator's buildkitd.toml fragment in force.
    pub bkconfig: bkconfig::Source,
}

impl Ctx {
    pub fn instances_dir(&self) -> PathBuf {
        self.run.host.state_dir.join("instances")
    }

    pub fn slots_in_use(&self) -> u64 {
        self.slots_total.saturating_sub(self.slots.available_permits() as u64)
    }

    /// Sets the gauges that are read off live state.
    pub fn refresh_gauges(&self) {
        self.metrics.slots_total.set(self.slots_total as i64);
        self.metrics.slots_in_use.set(self.slots_in_use() as i64);
        self.metrics.queue_depth.set(self.queued.load(Ordering::Relaxed) as i64);
        if let Some(n) = &self.network {
            self.metrics.network.refresh(n);
        }
    }
}

/// Resolves once the flag is set. (A `wait_for` result holds a lock guard,
/// which must not live across an await in a `select!`.)
pub async fn raised(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}

/// Resolves once the count satisfies `pred`.
pub async fn count_until(rx: &mut watch::Receiver<usize>, pred: impl FnMut(&usize) -> bool) {
    let _ = rx.wait_for(pred).await.map(|_| ());
}
