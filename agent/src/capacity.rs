//! Capacity: how many builds this node (or a node of a given shape) runs at
//! once, which resource binds, what is left over, and how many nodes a pool
//! needs for a target concurrency. `run` uses it for `--max-builds auto`,
//! `capacity` prints it for platform teams.

use crate::config::quantity::format_bytes;
use crate::config::{CapacityArgs, LimitArgs, MaxBuilds, OutputFormat};
use serde::Serialize;
use std::path::Path;

/// Memory, CPU and state dir disk of a node, as builds can use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub memory: u64,
    pub millicpus: u64,
    /// Bytes of the state dir's filesystem; per build, the disk limit
    /// (0: unlimited, which never binds).
    pub disk: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Binding {
    Memory,
    Cpu,
    Disk,
    /// `--max-builds N` was given.
    Fixed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub node: Shape,
    pub reserve: Shape,
    pub per_build: Shape,
    pub slots: u64,
    pub slots_by_memory: u64,
    pub slots_by_cpu: u64,
    /// None when builds have no disk limit (`--build-disk 0`).
    pub slots_by_disk: Option<u64>,
    pub binding: Binding,
    /// What is left after reserves and all slots (0 when overcommitted).
    pub headroom: Shape,
    /// True when the limits do not fit even once and the floor of one slot
    /// overcommits the node.
    pub overcommitted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_concurrency: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u64>,
}

/// The arithmetic: usable = node - reserve; slots = min over resources of
/// usable / per build, rounded down, at least 1. Disk counts the limits as
/// if every build filled its own (images are sparse, so a node holds more
/// images than it has bytes; the limits are what must fit).
pub fn plan(node: Shape, reserve: Shape, per_build: Shape, max: MaxBuilds, target: Option<u64>) -> Plan {
    let usable = Shape {
        memory: node.memory.saturating_sub(reserve.memory),
        millicpus: node.millicpus.saturating_sub(reserve.millicpus),
        disk: node.disk.saturating_sub(reserve.disk),
    };
    let by_mem = usable.memory / per_build.memory.max(1);
    let by_cpu = usable.millicpus / per_build.millicpus.max(1);
    let by_disk = (per_build.disk > 0).then(|| usable.disk / per_build.disk);
    let (slots, binding) = match max {
        MaxBuilds::Fixed(n) => (n.max(1), Binding::Fixed),
        MaxBuilds::Auto => {
            let mut best = (by_mem, Binding::Memory);
            if by_cpu < best.0 {
                best = (by_cpu, Binding::Cpu);
            }
            if let Some(d) = by_disk.filter(|d| *d < best.0) {
                best = (d, Binding::Disk);
            }
            (best.0.max(1), best.1)
        }
    };
    let used = Shape {
        memory: slots * per_build.memory,
        millicpus: slots * per_build.millicpus,
        disk: slots.saturating_mul(per_build.disk),
    };
    Plan {
        node,
        reserve,
        per_build,
        slots,
        slots_by_memory: by_mem,
        slots_by_cpu: by_cpu,
        slots_by_disk: by_disk,
        binding,
        headroom: Shape {
            memory: usable.memory.saturating_sub(used.memory),
            millicpus: usable.millicpus.saturating_sub(used.millicpus),
            disk: usable.disk.saturating_sub(used.disk),
        },
        overcommitted: used.memory > usable.memory || used.millicpus > usable.millicpus || used.disk > usable.disk,
        target_concurrency: target,
        nodes: target.map(|k| k.div_ceil(slots)),
    }
}

/// This node's shape: sysinfo's totals, lowered to the agent's own cgroup
/// limits when those are lower (a DaemonSet pod with limits, say).
pub fn this_node(cgroup_root: &Path, proc_root: &Path) -> Shape {
    use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
    let refresh =
        RefreshKind::nothing().with_memory(MemoryRefreshKind::everything()).with_cpu(CpuRefreshKind::nothing());
    let (mut memory, mut millicpus) = match System::new_with_specifics(refresh) {
        Ok(sys) => {
            let mem = sys.cgroup_limits().map(|l| l.total_memory).filter(|m| *m > 0 && *m < sys.total_memory());
            (mem.unwrap_or(sys.total_memory()), sys.cpus().len() as u64 * 1000)
        }
        Err(_) => (0, 0),
    };
    if let Some(own) = own_cgroup_limits(cgroup_root, proc_root) {
        if let Some(m) = own.memory.filter(|m| *m < memory || memory == 0) {
            memory = m;
        }
        if let Some(c) = own.millicpus.filter(|c| *c < millicpus || millicpus == 0) {
            millicpus = c;
        }
    }
    Shape { memory, millicpus, disk: 0 }
}

/// The memory and CPU limits of the agent's own cgroup, v1 or v2, read by
/// the shim library's cgroup driver (which writes the same files).
fn own_cgroup_limits(root: &Path, proc_root: &Path) -> Option<berth_shim::cgroup::Ceiling> {
    berth_shim::cgroup::ceiling_of(root, proc_root, "self").ok()
}

/// The plan `run` uses, from its flags and this node (disk: the state
/// dir's filesystem).
pub fn for_run(limits: &LimitArgs, cap: &CapacityArgs, host: &crate::config::HostArgs) -> Plan {
    let mut node = this_node(&host.cgroup_root, &host.proc_root);
    node.disk = crate::disk::state_fs(&host.state_dir).map(|f| f.size).unwrap_or(0);
    plan(node, reserve_of(cap, node.disk), per_build(limits), cap.max_builds, None)
}

/// What the node keeps for itself (`--reserve-memory`, `--reserve-cpus`,
/// and `--reserve-disk` resolved against a state dir filesystem of `disk`
/// bytes).
pub fn reserve_of(cap: &CapacityArgs, disk: u64) -> Shape {
    Shape { memory: cap.reserve_memory, millicpus: cap.reserve_cpus, disk: cap.reserve_disk.of(disk) }
}

pub fn per_build(limits: &LimitArgs) -> Shape {
    Shape { memory: limits.build_memory, millicpus: limits.build_cpus, disk: limits.build_disk }
}

pub fn cpus(m: u64) -> String {
    if m.is_multiple_of(1000) {
        format!("{}", m / 1000)
    } else {
        format!("{m}m")
    }
}

/// The human form of a plan.
pub fn render(plan: &Plan, format: OutputFormat) -> String {
    if format == OutputFormat::Json {
        return serde_json::to_string_pretty(plan).expect("plan serializes");
    }
    let s = |x: &Shape, limit: bool| {
        let disk = match (x.disk, limit) {
            (0, true) => "unlimited".to_string(),
            (d, _) => format_bytes(d),
        };
        format!("{} memory, {} CPU, {disk} disk", format_bytes(x.memory), cpus(x.millicpus))
    };
    let by_disk = plan.slots_by_disk.map_or("any number (no disk limit)".to_string(), |d| d.to_string());
    let mut out = format!(
        "node:      {}\nreserved:  {}\nper build: {}\nslots:     {} (memory allows {}, CPU allows {}, disk allows {by_disk}; bound by {})\nheadroom:  {}\n",
        s(&plan.node, false),
        s(&plan.reserve, false),
        s(&plan.per_build, true),
        plan.slots,
        plan.slots_by_memory,
        plan.slots_by_cpu,
        match plan.binding {
            Binding::Memory => "memory",
            Binding::Cpu => "CPU",
            Binding::Disk => "disk",
            Binding::Fixed => "--max-builds",
        },
        s(&plan.headroom, false),
    );
    if plan.overcommitted {
        out.push_str("warning:   the per-build limits do not fit this node; 1 slot is kept, overcommitted\n");
    }
    if let (Some(k), Some(n)) = (plan.target_concurrency, plan.nodes) {
        out.push_str(&format!("pool:      {n} node(s) of this shape for {k} concurrent builds\n"));
    }
    out
}

#[cfg(test)]
mod tests;

/// `berth-agent capacity`.
pub fn main(args: &crate::config::CapacityCmd) -> i32 {
    if args.cluster {
        return crate::publish::cluster::main(args);
    }
    let here = this_node(&args.host.cgroup_root, &args.host.proc_root);
    let disk = args.node_disk.or_else(|| crate::disk::state_fs(&args.host.state_dir).map(|f| f.size)).unwrap_or(0);
    let node = Shape {
        memory: args.node_memory.unwrap_or(here.memory),
        millicpus: args.node_cpus.unwrap_or(here.millicpus),
        disk,
    };
    let reserve = reserve_of(&args.capacity, node.disk);
    let p = plan(node, reserve, per_build(&args.limits), args.capacity.max_builds, args.target_concurrency);
    print!("{}", render(&p, args.output));
    if args.output == OutputFormat::Json {
        println!();
    }
    0
}
