//! cgroup v2: one unified hierarchy. Where instance cgroups go, and how the
//! controllers reach them, is `delegate`'s business; this file writes and
//! reads one instance's cgroup.

use super::{io_err, keyed, read_u64, write, CgroupError, Limits, Usage};
use crate::spec::CgroupSpec;
use std::fs;
use std::path::Path;

const CPU_PERIOD_US: u64 = 100_000;

pub(super) fn create(spec: &CgroupSpec, limits: &Limits) -> Result<(), CgroupError> {
    let d = &spec.dirs[0].1;
    fs::create_dir(d).map_err(io_err(d))?;
    write(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
    let swap = d.join("memory.swap.max");
    if swap.exists() {
        write(&swap, "0")?;
    }
    let quota = (limits.cpu_millis * CPU_PERIOD_US / 1000).max(1000);
    write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
    write(&d.join("pids.max"), &limits.pids.to_string())?;
    Ok(())
}

pub(super) fn usage(spec: &CgroupSpec) -> Usage {
    let d = &spec.dirs[0].1;
    Usage {
        peak_memory: read_u64(&d.join("memory.peak")),
        oom_kills: keyed(&d.join("memory.events"), "oom_kill").unwrap_or(0),
        pids_limit_hits: keyed(&d.join("pids.events"), "max").unwrap_or(0),
    }
}

/// `memory.max` and `cpu.max` of `dir`; `max` reads as no limit.
pub(super) fn ceiling(dir: &Path) -> super::Ceiling {
    let cpu = fs::read_to_string(dir.join("cpu.max")).ok().and_then(|s| {
        let mut it = s.split_whitespace();
        let (q, p) = (it.next()?.parse::<u64>().ok()?, it.next()?.parse::<u64>().ok()?);
        Some(q * 1000 / p.max(1))
    });
    super::Ceiling { memory: read_u64(&dir.join("memory.max")), millicpus: cpu }
}
