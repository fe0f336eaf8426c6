//! What putting a daemon into its cgroup costs on this host, for `check`
//! and the agent's start line. Moving a process into a cgroup (a write to
//! `cgroup.procs`, on any hierarchy, v1 or v2) takes the kernel's global
//! `cgroup_threadgroup_rwsem` for writing. Since Linux 6.0 that rwsem runs
//! in its fast-reader mode unless some cgroup hierarchy is mounted with
//! `favordynmods`, and a writer then waits for an RCU grace period: ~5 ms
//! on an idle host, 10 ms at p50 of a start on the test host
//! (docs/benchmarks.md). Before 6.0 it always ran in the slow-reader mode
//! (moves cheap, fork and exit a little dearer), which `favordynmods`
//! restores; one mount with it is enough, the rwsem is global.
//!
//! The shim avoids the move on cgroup v2 with kernel >= 5.7: the daemon is
//! born in its cgroup (clone3 CLONE_INTO_CGROUP, see run.rs). Elsewhere (v1,
//! hybrid hosts where berth uses v1 controllers, older kernels) each start
//! moves its daemon. Read through the configurable roots
//! (`<proc>/sys/kernel/osrelease`, `<proc>/self/mountinfo`,
//! `<cgroup-root>/cgroup.controllers`), so it is tested on temp trees.

use std::path::Path;

/// The kernel that first has clone3's CLONE_INTO_CGROUP.
pub const INTO_CGROUP: (u32, u32) = (5, 7);
/// The kernel that made the fast-reader mode (slow moves) the default.
pub const SLOW_MOVES: (u32, u32) = (6, 0);

/// How a daemon gets into its cgroup here, and what that costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveCost {
    /// cgroup v2 with clone3 into a cgroup: no move at all.
    BornIn,
    /// A move, cheap: a kernel before 6.0.
    CheapOldKernel,
    /// A move, cheap: this cgroup mount has favordynmods.
    CheapFavored(String),
    /// A move that waits for an RCU grace period on every start.
    Waits,
}

/// What the host looks like, as far as a start's cgroup step goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveView {
    /// `major.minor`; `None` when osrelease cannot be read or parsed.
    pub kernel: Option<(u32, u32)>,
    pub v2: bool,
    pub cost: MoveCost,
}

impl MoveView {
    pub fn kernel_shown(&self) -> String {
        match self.kernel {
            Some((a, b)) => format!("kernel {a}.{b}"),
            None => "kernel version unknown".to_string(),
        }
    }

    /// Why a start moves its daemon (for every cost but `BornIn`).
    pub fn why_moved(&self) -> String {
        match self.v2 {
            true => format!("{} has no clone3 CLONE_INTO_CGROUP (5.7+)", self.kernel_shown()),
            false => "cgroup v1 controllers: a process joins them only by a move".to_string(),
        }
    }
}

impl MoveView {
    /// What a start pays, in one sentence, and whether it waits for a grace
    /// period (then [`FAVOR_FIX`] applies): `check`'s "cgroup moves" line
    /// and the agent's start line say the same.
    pub fn summary(&self) -> (String, bool) {
        let (shown, why) = (self.kernel_shown(), self.why_moved());
        match &self.cost {
            MoveCost::BornIn => (
                format!(
                    "none on the start path: daemons are born in their cgroup (cgroup v2, clone3 CLONE_INTO_CGROUP, {shown}); a shim that finds clone3 refused (a seccomp profile) moves instead and logs why"
                ),
                false,
            ),
            MoveCost::CheapOldKernel => {
                (format!("each start moves its daemon ({why}); cheap before Linux 6.0 ({shown})"), false)
            }
            MoveCost::CheapFavored(mount) => (
                format!("each start moves its daemon ({why}), without waiting: {mount} is mounted with favordynmods"),
                false,
            ),
            MoveCost::Waits => (
                format!(
                    "each start moves its daemon ({why}), and cgroup moves wait for an RCU grace period (about 5-10 ms per start): no cgroup hierarchy is mounted with favordynmods ({shown})"
                ),
                true,
            ),
        }
    }
}

/// How to make moves cheap, for a host where they wait.
pub const FAVOR_FIX: &str = "remount the cgroup2 hierarchy with favordynmods: `mount -o remount,favordynmods \
/sys/fs/cgroup` (on a hybrid host its /sys/fs/cgroup/unified; a v1 hierarchy refuses the option at remount, so on a \
v1-only host mount cgroup2 once with it: `mount -t cgroup2 -o favordynmods none <dir>`); one mount is enough, the \
lock is global. Or boot a kernel built with CONFIG_CGROUP_FAVOR_DYNMODS=y. Fork and exit get slightly dearer";

/// `major.minor` of a kernel release string (`6.18.44-generic` -> (6, 18)).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Reads the host view. An unknown kernel counts as a recent one: the shim
/// tries clone3 anyway and logs when it had to move instead.
pub fn view(cgroup_root: &Path, proc_root: &Path) -> MoveView {
    let release = std::fs::read_to_string(proc_root.join("sys/kernel/osrelease")).unwrap_or_default();
    let kernel = kernel_version(&release);
    let v2 = cgroup_root.join("cgroup.controllers").exists();
    let cost = if v2 && kernel.is_none_or(|k| k >= INTO_CGROUP) {
        MoveCost::BornIn
    } else if kernel.is_some_and(|k| k < SLOW_MOVES) {
        MoveCost::CheapOldKernel
    } else {
        let mountinfo = std::fs::read_to_string(proc_root.join("self/mountinfo")).unwrap_or_default();
        crate::mountinfo::parse_fs(&mountinfo)
            .into_iter()
            .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
            .find(|m| m.super_options.iter().any(|o| o == "favordynmods"))
            .map(|m| MoveCost::CheapFavored(m.mount_point.display().to_string()))
            .unwrap_or(MoveCost::Waits)
    };
    MoveView { kernel, v2, cost }
}
