//! A small driver over cgroup v1 and v2: create an instance's cgroup with
//! limits (agent side), put the daemon in it, read what it used, empty and
//! remove it (shim side).
//!
//! Every path is derived from a configurable cgroup root and `/proc`, so unit
//! tests run on a tree of plain files and privileged tests on the real host.
//! We do not use cgroups-rs here: it discovers hierarchies from the live
//! `/proc/self/mountinfo` and cannot be pointed at a temp tree, and the few
//! files we need are simpler to write than to adapt.

pub mod delegate;
pub mod moves;
mod v1;
mod v2;

use crate::spec::{CgroupSpec, CgroupVersion};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Controllers berth limits, in the order they are set up.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Per-instance limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPU quota in millicores (1000 = one CPU).
    pub cpu_millis: u64,
    pub pids: u64,
}

/// What an instance's cgroup recorded before removal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub peak_memory: Option<u64>,
    pub oom_kills: u64,
    pub pids_limit_hits: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {msg}")]
    Layout { path: PathBuf, msg: String },
    #[error("{path}: Device or resource busy (EBUSY): cgroup v2 enables controllers for child cgroups only in a cgroup with no processes of its own, and {cgroup} holds {who}. Fix: pass --cgroup-parent to a delegated cgroup with no processes in it, or leave {cgroup} to the agent alone (no other process or exec session in it when the agent starts)")]
    Busy { path: PathBuf, cgroup: PathBuf, who: String },
    #[error("{path}: still has processes {pids:?} after {waited:?}")]
    NotEmpty { path: PathBuf, pids: Vec<i32>, waited: Duration },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_path_buf(), source }
}

pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

/// Reads `key value` lines (memory.events, pids.events, memory.oom_control).
pub(crate) fn keyed(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok()).flatten()
    })
}

pub(crate) fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Where instance cgroups go on this host: the version and, per controller,
/// the parent dir. Built by the agent once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub version: CgroupVersion,
    /// `(controller, parent dir)`; on v2 one entry `("unified", dir)`.
    pub parents: Vec<(String, PathBuf)>,
}

impl Layout {
    /// Creates the cgroup `name` under every parent and writes the limits.
    /// On failure, whatever was created is removed again.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<CgroupSpec, CgroupError> {
        let spec = self.plan(name);
        let res = match self.version {
            CgroupVersion::V1 => v1::create(&spec, limits),
            CgroupVersion::V2 => v2::create(&spec, limits),
        };
        if let Err(e) = res {
            for (_, d) in &spec.dirs {
                let _ = fs::remove_dir(d);
            }
            return Err(e);
        }
        Ok(spec)
    }

    /// The dirs `create(name)` would make, so the agent can record them in the
    /// spec before they exist (a crash in between leaves nothing unrecorded).
    pub fn plan(&self, name: &str) -> CgroupSpec {
        CgroupSpec {
            version: self.version,
            dirs: self.parents.iter().map(|(c, p)| (c.clone(), p.join(name))).collect(),
        }
    }

    /// Children of the parents whose name starts with `prefix`: what a dead
    /// agent may have left when it crashed between mkdir and writing a spec.
    pub fn children(&self, prefix: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for (_, p) in &self.parents {
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with(prefix) && e.path().is_dir() {
                        out.push(e.path());
                    }
                }
            }
        }
        out
    }
}

/// Moves `pid` into every dir of the instance's cgroup.
pub fn join(spec: &CgroupSpec, pid: i32) -> Result<(), CgroupError> {
    for (_, d) in &spec.dirs {
        write(&d.join("cgroup.procs"), &pid.to_string())?;
    }
    Ok(())
}

/// Pids in any dir of the instance's cgroup (missing dirs count as empty).
pub fn procs(spec: &CgroupSpec) -> Vec<i32> {
    let mut pids: Vec<i32> = spec
        .dirs
        .iter()
        .filter_map(|(_, d)| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<_>>())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// What the instance used; read before removal, since removal loses it.
pub fn usage(spec: &CgroupSpec) -> Usage {
    match spec.version {
        CgroupVersion::V1 => v1::usage(spec),
        CgroupVersion::V2 => v2::usage(spec),
    }
}

/// SIGKILLs every process left in the cgroup until it is empty, bounded by
/// `timeout`. On v2 `cgroup.kill` does it atomically; on v1 we loop, since a
/// process may fork between our read and our kill.
pub fn kill_all(spec: &CgroupSpec, timeout: Duration) -> Result<(), CgroupError> {
    let start = Instant::now();
    if spec.version == CgroupVersion::V2 {
        if let Some(d) = spec.dirs.first().map(|(_, d)| d) {
            let kill = d.join("cgroup.kill");
            if kill.exists() {
                let _ = fs::write(&kill, "1");
            }
        }
    }
    loop {
        let pids = procs(spec);
        if pids.is_empty() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            let path = spec.dirs.first().map(|(_, d)| d.clone()).unwrap_or_default();
            return Err(CgroupError::NotEmpty { path, pids, waited: timeout });
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        sleep(Duration::from_millis(10));
    }
}

/// Removes every dir of the instance's cgroup. A dir that is already gone is
/// fine; one that stays busy past `timeout` is an error naming it.
pub fn remove(spec: &CgroupSpec, timeout: Duration) -> Result<(), CgroupError> {
    for (_, d) in &spec.dirs {
        remove_dir(d, timeout)?;
    }
    Ok(())
}

/// rmdir with retries: the kernel may report EBUSY for a moment after the
/// last process of a cgroup is reaped.
pub fn remove_dir(dir: &Path, timeout: Duration) -> Result<(), CgroupError> {
    let start = Instant::now();
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if start.elapsed() < timeout => {
                let _ = e;
                sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(CgroupError::Io { path: dir.to_path_buf(), source: e }),
        }
    }
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcCgroup {
    pub hierarchy: String,
    /// Comma-separated controllers (`cpu,cpuacct`, `name=systemd`); empty on
    /// the v2 line.
    pub controllers: String,
    pub path: String,
}

impl ProcCgroup {
    /// Whether this line is for `controller` (`""` names the v2 line).
    pub fn has(&self, controller: &str) -> bool {
        if controller.is_empty() {
            self.controllers.is_empty()
        } else {
            self.controllers.split(',').any(|c| c == controller)
        }
    }
}

/// Parses the text of `/proc/<pid>/cgroup`; malformed lines are skipped.
pub fn parse_proc(text: &str) -> Vec<ProcCgroup> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (hierarchy, controllers, path) = (it.next()?, it.next()?, it.next()?);
            Some(ProcCgroup { hierarchy: hierarchy.into(), controllers: controllers.into(), path: path.into() })
        })
        .collect()
}

/// The entries of `<proc>/<pid>/cgroup` (`pid` may be `self`).
pub fn proc_cgroups(proc_root: &Path, pid: &str) -> Result<Vec<ProcCgroup>, CgroupError> {
    let file = proc_root.join(pid).join("cgroup");
    Ok(parse_proc(&fs::read_to_string(&file).map_err(io_err(&file))?))
}

/// The cgroup path `<proc>/<pid>/cgroup` gives for a controller (`""` is the
/// v2 entry). Used for the agent's own cgroup and for peer identity.
pub fn path_of(proc_root: &Path, pid: &str, controller: &str) -> Result<String, CgroupError> {
    match proc_cgroups(proc_root, pid)?.into_iter().find(|e| e.has(controller)) {
        Some(e) => Ok(e.path),
        None => Err(CgroupError::Layout {
            path: proc_root.join(pid).join("cgroup"),
            msg: format!("no entry for controller {controller:?}"),
        }),
    }
}

/// The memory and CPU ceilings of a cgroup; `None` where it sets none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ceiling {
    pub memory: Option<u64>,
    /// CPU quota in millicores.
    pub millicpus: Option<u64>,
}

/// The ceilings of the cgroup `<proc>/<pid>` is in, v1 or v2 (the agent's
/// own, for its capacity plan). The files are the ones `create` writes.
pub fn ceiling_of(root: &Path, proc_root: &Path, pid: &str) -> Result<Ceiling, CgroupError> {
    let entries = proc_cgroups(proc_root, pid)?;
    let rel = |c: &str| entries.iter().find(|e| e.has(c)).map(|e| e.path.trim_start_matches('/').to_string());
    if root.join("cgroup.controllers").exists() {
        let mut dir = root.join(rel("").unwrap_or_default());
        // issue 17: moved into its leaf, the agent's limits are its parent's.
        if pid == "self" && dir.ends_with(delegate::AGENT_LEAF) {
            dir.pop();
        }
        return Ok(v2::ceiling(&dir));
    }
    let mem = rel("memory").map(|r| root.join("memory").join(r));
    let cpu = rel("cpu").map(|r| root.join("cpu").join(r));
    Ok(v1::ceiling(mem.as_deref(), cpu.as_deref()))
}

#[cfg(test)]
mod tests;
