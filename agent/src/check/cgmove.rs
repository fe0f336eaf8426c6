//! `check`'s "cgroup moves" item: does every start wait for an RCU grace
//! period to move its daemon into its cgroup? The host view and the kernel
//! facts are `berth_shim::cgroup::moves`; the agent's start line says the
//! same once (run.rs). Informational: nothing fails for it.
#![forbid(unsafe_code)]

use super::{info, ok, Item};
use berth_shim::cgroup::moves;
use std::path::Path;

const N: &str = "cgroup moves";

pub fn check(cgroup_root: &Path, proc_root: &Path) -> Item {
    match moves::view(cgroup_root, proc_root).summary() {
        (detail, true) => info(N, detail, moves::FAVOR_FIX),
        (detail, false) => ok(N, detail),
    }
}
