//! `check`'s "cgroup moves" item: does every start wait for an RCU grace
//! period to move its daemon into its cgroup? The host view and the kernel
//! facts are `berth_shim::cgroup::moves`; the agent's start line says the
//! same once (run.rs). Informational: nothing fails for it.
#![forbid(unsafe_code)]

use super::{info, ok, Item};
use berth_shim::cgroup::moves::{self, MoveCost};
use std::path::Path;

const N: &str = "cgroup moves";

pub fn check(cgroup_root: &Path, proc_root: &Path) -> Item {
    let v = moves::view(cgroup_root, proc_root);
    let (shown, why) = (v.kernel_shown(), v.why_moved());
    match v.cost {
        MoveCost::BornIn => ok(
            N,
            format!(
                "none on the start path: daemons are born in their cgroup (cgroup v2, clone3 CLONE_INTO_CGROUP, {shown}); a shim that finds clone3 refused (a seccomp profile) moves instead and logs why"
            ),
        ),
        MoveCost::CheapOldKernel => {
            ok(N, format!("each start moves its daemon ({why}); cheap before Linux 6.0 ({shown})"))
        }
        MoveCost::CheapFavored(mount) => {
            ok(N, format!("each start moves its daemon ({why}), without waiting: {mount} is mounted with favordynmods"))
        }
        MoveCost::Waits => info(
            N,
            format!(
                "each start moves its daemon ({why}), and cgroup moves wait for an RCU grace period (about 5-10 ms per start): no cgroup hierarchy is mounted with favordynmods ({shown})"
            ),
            moves::FAVOR_FIX,
        ),
    }
}
