//! cgroup v2: one unified hierarchy. Controllers must be enabled in the
//! parent's `cgroup.subtree_control`, and a cgroup with processes cannot
//! enable them ("no internal processes"), so the agent's own processes move
//! to a leaf first when instances nest under the agent's own cgroup.

use super::{io_err, keyed, path_of, read_u64, write, CgroupError, Limits, Usage, CONTROLLERS};
use crate::spec::{CgroupSpec, CgroupVersion};
use std::fs;
use std::path::Path;

const CPU_PERIOD_US: u64 = 100_000;
/// The leaf the agent's own processes move into under its cgroup.
pub const AGENT_LEAF: &str = "agent";

pub(super) fn layout(root: &Path, proc_root: &Path, parent: Option<&str>) -> Result<super::Layout, CgroupError> {
    let rel = match parent {
        Some(p) => p.to_string(),
        None => path_of(proc_root, "self", "")?,
    };
    let dir = root.join(rel.trim_start_matches('/'));
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> =
        CONTROLLERS.iter().copied().filter(|c| !available.split_whitespace().any(|a| a == *c)).collect();
    if !missing.is_empty() {
        return Err(CgroupError::Layout {
            path: dir.join("cgroup.controllers"),
            msg: format!(
                "controllers {missing:?} are not delegated here; enable them in the parent's cgroup.subtree_control or pass --cgroup-parent"
            ),
        });
    }
    // Move any processes of the parent (the agent itself, when nesting under
    // its own cgroup) to a leaf, so the parent may enable controllers.
    let procs_file = dir.join("cgroup.procs");
    let procs = fs::read_to_string(&procs_file).unwrap_or_default();
    if procs.lines().any(|l| !l.trim().is_empty()) {
        let leaf = dir.join(AGENT_LEAF);
        fs::create_dir_all(&leaf).map_err(io_err(&leaf))?;
        for pid in procs.lines().map(str::trim).filter(|l| !l.is_empty()) {
            // A process may exit between read and write; that is fine.
            let _ = fs::write(leaf.join("cgroup.procs"), pid);
        }
    }
    let enable: Vec<String> = CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
    write(&dir.join("cgroup.subtree_control"), &enable.join(" "))?;
    Ok(super::Layout { version: CgroupVersion::V2, parents: vec![("unified".to_string(), dir)] })
}

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
