//! cgroup v1: one hierarchy per controller, each with its own nesting (on
//! hybrid hosts the memory cgroup of a process often differs from its cpu one).

use super::{io_err, keyed, read_u64, write, CgroupError, Limits, Usage};
use crate::spec::CgroupSpec;
use std::fs;
use std::path::{Path, PathBuf};

/// CFS period; the quota is scaled to it.
const CFS_PERIOD_US: u64 = 100_000;

/// The mount of a controller: `<root>/<c>`, or a co-mounted dir such as
/// `cpu,cpuacct` when no alias exists.
pub(super) fn mount_of(root: &Path, controller: &str) -> Result<PathBuf, CgroupError> {
    let direct = root.join(controller);
    if direct.is_dir() {
        return Ok(direct);
    }
    let rd = fs::read_dir(root).map_err(io_err(root))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.split(',').any(|c| c == controller) && e.path().is_dir() {
            return Ok(e.path());
        }
    }
    Err(CgroupError::Layout {
        path: root.to_path_buf(),
        msg: format!("no cgroup v1 hierarchy for the {controller} controller is mounted"),
    })
}

pub(super) fn create(spec: &CgroupSpec, limits: &Limits) -> Result<(), CgroupError> {
    for (_, d) in &spec.dirs {
        fs::create_dir(d).map_err(io_err(d))?;
    }
    if let Some(d) = spec.dir_of("memory") {
        write(&d.join("memory.limit_in_bytes"), &limits.memory_bytes.to_string())?;
        // With swap accounting, memory+swap gets the same cap: a build must
        // not escape its limit by swapping.
        let memsw = d.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write(&memsw, &limits.memory_bytes.to_string())?;
        }
    }
    if let Some(d) = spec.dir_of("cpu") {
        write(&d.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
        let quota = (limits.cpu_millis * CFS_PERIOD_US / 1000).max(1000);
        write(&d.join("cpu.cfs_quota_us"), &quota.to_string())?;
    }
    if let Some(d) = spec.dir_of("pids") {
        write(&d.join("pids.max"), &limits.pids.to_string())?;
    }
    Ok(())
}

pub(super) fn usage(spec: &CgroupSpec) -> Usage {
    let mem = spec.dir_of("memory");
    Usage {
        peak_memory: mem.and_then(|d| read_u64(&d.join("memory.max_usage_in_bytes"))),
        oom_kills: mem.and_then(|d| keyed(&d.join("memory.oom_control"), "oom_kill")).unwrap_or(0),
        pids_limit_hits: spec.dir_of("pids").and_then(|d| keyed(&d.join("pids.events"), "max")).unwrap_or(0),
    }
}

/// `memory.limit_in_bytes` and the CFS quota over its period. v1 reports
/// "no limit" as a huge page-aligned number, and a quota of -1.
pub(super) fn ceiling(mem: Option<&Path>, cpu: Option<&Path>) -> super::Ceiling {
    let memory = mem.and_then(|d| read_u64(&d.join("memory.limit_in_bytes"))).filter(|m| *m < 1 << 62);
    let quota = cpu.and_then(|d| fs::read_to_string(d.join("cpu.cfs_quota_us")).ok()?.trim().parse::<i64>().ok());
    let period = cpu.and_then(|d| read_u64(&d.join("cpu.cfs_period_us")));
    let millicpus = quota.filter(|q| *q > 0).zip(period).map(|(q, p)| q as u64 * 1000 / p.max(1));
    super::Ceiling { memory, millicpus }
}
