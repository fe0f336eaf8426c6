//! Disk, as the agent sees it: the state dir's filesystem for the whole
//! node (its size for `--max-builds auto`, its free space against
//! `--reserve-disk` at admission), and each instance's own filesystem
//! (sampled with statfs while it runs, for its peak usage and the moment
//! it fills its limit). The mechanism itself (image, loop device, mount) is
//! the shim library's `disk` module: spawn acquires, the shim releases.
#![forbid(unsafe_code)]

pub mod spares;

use crate::config::quantity::format_bytes;
use crate::config::RunArgs;
use crate::error::AdmitError;
use crate::instance::Instance;
use crate::Ctx;
use berth_shim::disk::Usage;
use berth_shim::spec::Outcome;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// How often a running instance's filesystem is sampled. statfs is a few
/// microseconds; a fill-and-delete faster than this escapes the peak figure
/// (never the limit, which the kernel enforces).
pub const DISK_POLL: Duration = Duration::from_millis(250);

/// A filesystem's size and the space an unprivileged writer still has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fs {
    pub size: u64,
    pub free: u64,
}

/// The filesystem holding `state_dir` (or its nearest existing ancestor,
/// for `capacity` on a node where the agent has not run yet).
pub fn state_fs(state_dir: &Path) -> Option<Fs> {
    let mut p = state_dir;
    loop {
        if let Ok(st) = nix::sys::statvfs::statvfs(p) {
            let fr = st.fragment_size() as u64;
            return Some(Fs { size: st.blocks() as u64 * fr, free: st.blocks_available() as u64 * fr });
        }
        p = p.parent()?;
    }
}

/// `run`'s start-up check: a disk limit needs the mechanism (loop devices,
/// mkfs.ext4); without it only an explicit `--build-disk 0` runs.
pub fn preflight(args: &RunArgs) -> Result<(), String> {
    if args.limits.build_disk == 0 {
        return Ok(());
    }
    berth_shim::disk::mechanism().map_err(|e| {
        format!(
            "--build-disk {} needs a per-build filesystem, and this node cannot make one: {e}. \
             Fix that (see `berth-agent check`), or run with --build-disk 0 to run builds without a disk limit",
            format_bytes(args.limits.build_disk)
        )
    })
}

/// Admission: while the state dir's free space is below `--reserve-disk`,
/// no new instance starts (running ones go on).
pub fn admit(ctx: &Ctx) -> Result<(), AdmitError> {
    let state = &ctx.run.host.state_dir;
    let Some(fs) = state_fs(state) else { return Ok(()) };
    let reserve = ctx.run.capacity.reserve_disk.of(fs.size);
    if fs.free >= reserve {
        return Ok(());
    }
    Err(AdmitError::Exhausted(format!(
        "node {}: disk full: the state dir {} has {} free, below --reserve-disk {} ({}); \
         new builds are refused until space is freed (running builds go on)",
        ctx.node_name,
        state.display(),
        human(fs.free),
        ctx.run.capacity.reserve_disk,
        human(reserve),
    )))
}

/// A size for people: whole in its largest binary unit when exact
/// (`64Mi`), else with one decimal (`147.8Mi`), never `151328Ki`.
pub fn human(b: u64) -> String {
    for (unit, size) in [("Ti", 1u64 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if b >= size {
            return match b.is_multiple_of(size) {
                true => format!("{}{unit}", b / size),
                false => format!("{:.1}{unit}", b as f64 / size as f64),
            };
        }
    }
    b.to_string()
}

/// Samples a running instance's filesystem until it is wiped: peak usage,
/// and each time it fills its limit a log line (`reason="disk"`) and the
/// `berth_limit_hits_total{reason="disk"}` counter.
pub async fn watch(ctx: Arc<Ctx>, inst: Arc<Instance>) {
    if ctx.run.limits.build_disk == 0 {
        return;
    }
    let root = inst.dir.join(berth_shim::spec::ROOT_DIR);
    loop {
        tokio::select! {
            _ = inst.wiped() => return,
            _ = tokio::time::sleep(DISK_POLL) => {}
        }
        if !matches!(*inst.phase.borrow(), crate::phase::Phase::Ready) {
            continue;
        }
        let Some(u) = berth_shim::disk::usage(&root) else { continue };
        if inst.disk.sample(&u) {
            hit(&ctx, &inst, &u);
        }
    }
}

fn hit(ctx: &Ctx, inst: &Instance, u: &Usage) {
    ctx.metrics.limit_hits.get_or_create(&crate::metrics::ReasonLabel { reason: "disk".into() }).inc();
    warn!(
        instance = %inst.id,
        client = %inst.client().display,
        reason = "disk",
        limit = %format_bytes(ctx.run.limits.build_disk),
        limit_bytes = ctx.run.limits.build_disk,
        peak_disk = inst.disk.peak(),
        used = u.used,
        "the build filled its disk limit: its writes fail with ENOSPC (no space left on device)"
    );
}

/// The instance's disk at its end: the shim's final statfs folded into
/// what was sampled. A fill seen only at the end counts as a hit too.
#[derive(Debug, Default, Clone, Copy)]
pub struct AtEnd {
    pub limit: Option<u64>,
    pub peak: Option<u64>,
    pub last: Option<u64>,
    /// The instance filled its disk at some point of its life.
    pub hit: bool,
}

pub fn at_end(ctx: &Ctx, inst: &Instance, outcome: Option<&Outcome>) -> AtEnd {
    let limit = (ctx.run.limits.build_disk > 0).then_some(ctx.run.limits.build_disk);
    let last = outcome.and_then(|o| o.disk);
    if let Some(u) = &last {
        if inst.disk.sample(u) {
            hit(ctx, inst, u);
        }
    }
    let peak = inst.disk.peak();
    let seen = last.is_some() || peak > 0;
    if let Some(p) = seen.then_some(peak) {
        ctx.metrics.peak_disk_bytes.observe(p as f64);
    }
    AtEnd { limit, peak: seen.then_some(peak), last: last.map(|u| u.used), hit: inst.disk.hits() > 0 }
}

/// The plain-words part of the end note when the daemon died with its disk
/// full.
pub fn why(end: &AtEnd, exit: &str) -> String {
    format!(
        "its build filled the disk limit of {} ({} used at the peak) and then {}",
        end.limit.map(human).unwrap_or_else(|| "?".into()),
        end.peak.map(human).unwrap_or_else(|| "?".into()),
        exit.strip_prefix("the daemon").map(|r| format!("the daemon{r}")).unwrap_or_else(|| exit.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_fs_walks_up_to_an_existing_dir() {
        let t = tempfile::tempdir().unwrap();
        let fs = state_fs(&t.path().join("not/yet/made")).unwrap();
        assert!(fs.size > 0 && fs.free <= fs.size);
        assert_eq!(state_fs(t.path()).unwrap().size, fs.size);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(64 << 20), "64Mi");
        assert_eq!(human(151328 << 10), "147.8Mi");
        assert_eq!(human(57 * (1 << 20) + (1 << 19)), "57.5Mi");
        assert_eq!(human(1000), "1000");
    }

    #[test]
    fn why_names_limit_peak_and_exit() {
        let e = AtEnd { limit: Some(64 << 20), peak: Some(64 << 20), last: Some(1), hit: true };
        assert_eq!(
            why(&e, "the daemon exited with status 1"),
            "its build filled the disk limit of 64Mi (64Mi used at the peak) and then the daemon exited with status 1"
        );
    }
}
