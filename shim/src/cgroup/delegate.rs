//! Where instance cgroups go, and what the agent changes in the host's
//! cgroup tree to put them there: planned without side effects ([`plan`];
//! `check` probes the plan with [`Plan::probe`], which only makes and removes
//! a throwaway child), applied once by `run` ([`Plan::apply`]) and undone when
//! it exits ([`Delegation::undo`]).
//!
//! cgroup v2 lets a cgroup enable controllers for its children only while it
//! holds no processes of its own; the root cgroup is exempt. So on v2:
//! - the agent in the real root cgroup moves nothing: instances go under a
//!   dedicated child, `/berth`;
//! - with `--cgroup-parent`, instances go there, and every dir on the way is
//!   created if missing and passes the controllers on to the next;
//! - elsewhere (a systemd service, a container's cgroup) the agent moves only
//!   itself into the leaf `<own>/agent` and enables the controllers in `<own>`;
//! - a process exec'd into a live agent's leaf (`kubectl exec`) uses the live
//!   agent's placement and moves nothing.
//!
//! The agent's own move (its leaf, the controllers enabled in its cgroup) is
//! recorded and undone on exit, so a supervisor finds its cgroup as it left
//! it and a restart there works. A shared instance parent (`/berth`, a
//! `--cgroup-parent`) stays for the next agent; a failed start undoes all.
//! On v1 there is no such rule: only missing parent dirs are created.

use super::{io_err, path_of, v1, write, CgroupError, Layout, Limits, CONTROLLERS};
use crate::spec::CgroupVersion;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The leaf the agent moves itself into, under its own cgroup (v2).
pub const AGENT_LEAF: &str = "agent";
/// The dedicated child of the v2 root cgroup that holds the instances of an
/// agent running in the root cgroup.
pub const ROOT_CHILD: &str = "berth";

/// How the instance parent relates to the agent's own cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// cgroup v1: the configured parent or the agent's own cgroup, per controller.
    V1,
    /// v2, the agent sits in the real root cgroup: instances under `/berth`.
    RootChild,
    /// v2, `--cgroup-parent`.
    Parent,
    /// v2, the agent's own cgroup; the agent moves itself into its leaf.
    OwnLeaf,
    /// v2, already in a live agent's leaf: instances beside it, nothing moves.
    InLeaf,
}

/// The placement of instance cgroups on this host, not yet applied.
#[derive(Debug, Clone)]
pub struct Plan {
    pub layout: Layout,
    pub placement: Placement,
    /// v2: the dirs that must pass the controllers on, top-down, ending with
    /// the instance parent. v1: the instance parents.
    chain: Vec<PathBuf>,
    proc_root: PathBuf,
}

/// What [`Plan::apply`] changed, to be undone on exit. Dropping it undoes it.
#[derive(Debug, Default)]
pub struct Delegation {
    created: Vec<PathBuf>,
    /// `(dir, controllers enabled there, its child cgroups at that moment)`.
    enabled: Vec<(PathBuf, Vec<&'static str>, Vec<String>)>,
    /// `(pid, the cgroup it came from, the leaf it went to)`.
    moved: Option<(u32, PathBuf, PathBuf)>,
}

/// What `check` learned from a throwaway cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub detail: String,
    /// Something that will make `run` fail or behave differently, with the fix.
    pub warning: Option<String>,
}

/// Reads where the agent sits and where its instances would go; changes nothing.
pub fn plan(root: &Path, proc_root: &Path, parent: Option<&str>) -> Result<Plan, CgroupError> {
    let proc_root = proc_root.to_path_buf();
    if !root.join("cgroup.controllers").exists() {
        let mut parents = Vec::new();
        for c in CONTROLLERS {
            let rel = match parent {
                Some(p) => p.to_string(),
                None => path_of(&proc_root, "self", c)?,
            };
            parents.push((c.to_string(), v1::mount_of(root, c)?.join(rel.trim_start_matches('/'))));
        }
        let chain = parents.iter().map(|(_, d)| d.clone()).collect();
        let layout = Layout { version: CgroupVersion::V1, parents };
        return Ok(Plan { layout, placement: Placement::V1, chain, proc_root });
    }
    let (placement, chain) = match parent {
        Some(p) => (Placement::Parent, down_from(root, p)),
        None => {
            let own = root.join(path_of(&proc_root, "self", "")?.trim_start_matches('/'));
            // The real root has no cgroup.type; the root of a cgroup namespace
            // (a container's own cgroup) has one and follows the usual rule.
            if own == root && !root.join("cgroup.type").exists() {
                (Placement::RootChild, vec![root.to_path_buf(), root.join(ROOT_CHILD)])
            } else if own.file_name().is_some_and(|n| n == AGENT_LEAF)
                && own.parent().is_some_and(|p| missing_in(p, "cgroup.subtree_control").is_empty())
            {
                (Placement::InLeaf, vec![own.parent().expect("checked").to_path_buf()])
            } else {
                (Placement::OwnLeaf, vec![own])
            }
        }
    };
    let parent_dir = chain.last().expect("chain is never empty").clone();
    let layout = Layout { version: CgroupVersion::V2, parents: vec![("unified".to_string(), parent_dir)] };
    Ok(Plan { layout, placement, chain, proc_root })
}

/// `root`, then each dir down to `root/rel`.
fn down_from(root: &Path, rel: &str) -> Vec<PathBuf> {
    let mut dirs = vec![root.to_path_buf()];
    for part in Path::new(rel.trim_start_matches('/')).components() {
        let next = dirs.last().expect("non-empty").join(part);
        dirs.push(next);
    }
    dirs
}

/// Controllers berth needs that `dir/<file>` does not list.
fn missing_in(dir: &Path, file: &str) -> Vec<&'static str> {
    let text = fs::read_to_string(dir.join(file)).unwrap_or_default();
    CONTROLLERS.iter().copied().filter(|c| !text.split_whitespace().any(|a| a == *c)).collect()
}

fn not_delegated(dir: &Path, missing: &[&str]) -> CgroupError {
    CgroupError::Layout {
        path: dir.join("cgroup.controllers"),
        msg: format!(
            "controllers {missing:?} are not delegated here; enable them in the parent's cgroup.subtree_control or pass --cgroup-parent"
        ),
    }
}

/// The pids in `dir` other than `except` (0 is a process outside our pid namespace).
fn others(dir: &Path, except: u32) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|p| *p != except)
        .collect()
}

/// The EBUSY of `cgroup.subtree_control`, in plain words: who is in the way.
fn busy(proc_root: &Path, dir: &Path, pids: &[u32]) -> CgroupError {
    let mut who: Vec<String> = pids
        .iter()
        .filter(|p| **p != 0)
        .map(|p| {
            let comm = fs::read_to_string(proc_root.join(p.to_string()).join("comm")).unwrap_or_default();
            format!("pid {p} ({})", comm.trim())
        })
        .collect();
    if pids.is_empty() || pids.contains(&0) {
        who.push("a process outside the agent's pid namespace".into());
    }
    CgroupError::Busy { path: dir.join("cgroup.subtree_control"), cgroup: dir.to_path_buf(), who: who.join(", ") }
}

impl Plan {
    /// Makes the plan true: creates missing dirs, moves the agent (and only
    /// it) into its leaf where it must, enables the controllers. On failure
    /// whatever was done is undone before the error returns.
    pub fn apply(&self) -> Result<(Layout, Delegation), CgroupError> {
        let mut d = Delegation::default();
        match self.apply_into(&mut d) {
            Ok(()) => {
                // A shared instance parent (`--cgroup-parent`, `/berth`) stays:
                // a second agent beside this one (a surge rollout, parallel
                // agents on one parent) creates its instances there after we
                // exit. It holds no process, so it blocks no restart. Only
                // the agent's own move is undone on exit.
                if self.placement != Placement::OwnLeaf {
                    d.created.clear();
                    d.enabled.clear();
                }
                Ok((self.layout.clone(), d))
            }
            Err(e) => {
                d.undo();
                Err(e)
            }
        }
    }

    fn apply_into(&self, d: &mut Delegation) -> Result<(), CgroupError> {
        let me = std::process::id();
        match self.placement {
            Placement::V1 => {
                for dir in &self.chain {
                    d.mkdir_all(dir)?;
                }
            }
            Placement::InLeaf => {}
            Placement::RootChild | Placement::Parent => {
                d.mkdir_all(self.chain.last().expect("non-empty"))?;
                for dir in &self.chain {
                    let missing = missing_in(dir, "cgroup.controllers");
                    if !missing.is_empty() {
                        return Err(not_delegated(dir, &missing));
                    }
                    d.enable(dir, &self.proc_root, me)?;
                }
            }
            Placement::OwnLeaf => {
                let own = &self.chain[0];
                let missing = missing_in(own, "cgroup.controllers");
                if !missing.is_empty() {
                    return Err(not_delegated(own, &missing));
                }
                // Anyone else in our cgroup makes the enable fail: say so
                // before moving anything.
                let in_the_way = others(own, me);
                if !in_the_way.is_empty() {
                    return Err(busy(&self.proc_root, own, &in_the_way));
                }
                let leaf = own.join(AGENT_LEAF);
                d.mkdir_all(&leaf)?;
                write(&leaf.join("cgroup.procs"), &me.to_string())?;
                d.moved = Some((me, own.clone(), leaf));
                d.enable(own, &self.proc_root, me)?;
            }
        }
        Ok(())
    }

    /// For `check`: tries the plan in a throwaway child cgroup, removed
    /// again, and never moves a process. Where the controllers are already
    /// passed on, the child gets real limits; elsewhere it proves the tree is
    /// writable and reads whether `run` could enable them.
    pub fn probe(&self, limits: &Limits) -> Result<Probe, CgroupError> {
        let name = format!("berth-check-{}", std::process::id());
        let me = std::process::id();
        // The deepest dir of the chain that exists: where the child goes.
        let base = match self.placement {
            Placement::V1 => None,
            _ => self.chain.iter().rev().find(|d| d.is_dir()).cloned(),
        };
        if self.placement == Placement::V1 {
            let parents: Vec<(String, PathBuf)> = self
                .layout
                .parents
                .iter()
                .map(|(c, p)| (c.clone(), p.ancestors().find(|a| a.is_dir()).unwrap_or(p).to_path_buf()))
                .collect();
            let probe = Layout { version: CgroupVersion::V1, parents };
            let spec = probe.create(&name, limits)?;
            let _ = super::remove(&spec, Duration::from_secs(2));
            let created = self.layout.parents.iter().filter(|(_, p)| !p.is_dir()).count();
            let where_: Vec<String> = self.layout.parents.iter().map(|(c, p)| format!("{c}={}", p.display())).collect();
            let mut detail = format!("V1, memory+cpu+pids limits work under {}", where_.join(" "));
            if created > 0 {
                detail.push_str(" (missing parents are created at start)");
            }
            return Ok(Probe { detail, warning: None });
        }
        let base = base.ok_or_else(|| CgroupError::Layout {
            path: self.chain[0].clone(),
            msg: "no cgroup2 hierarchy here".into(),
        })?;
        let parent = &self.layout.parents[0].1;
        if base == *parent && missing_in(parent, "cgroup.subtree_control").is_empty() {
            let probe = Layout { version: CgroupVersion::V2, parents: vec![("unified".into(), base.clone())] };
            let spec = probe.create(&name, limits)?;
            let _ = super::remove(&spec, Duration::from_secs(2));
            return Ok(Probe {
                detail: format!("V2, memory+cpu+pids limits work under {} ({:?})", parent.display(), self.placement),
                warning: None,
            });
        }
        // The controllers are not passed on yet: `run` enables them. A
        // throwaway child shows the tree is writable; the files say whether
        // the enable can work.
        let child = base.join(&name);
        fs::create_dir(&child).map_err(io_err(&child))?;
        let _ = super::remove_dir(&child, Duration::from_secs(2));
        let missing = missing_in(&base, "cgroup.controllers");
        if !missing.is_empty() {
            return Err(not_delegated(&base, &missing));
        }
        let is_root = !base.join("cgroup.type").exists();
        let in_the_way = others(&base, me);
        let warning = (!is_root && !in_the_way.is_empty() && !missing_in(&base, "cgroup.subtree_control").is_empty())
            .then(|| busy(&self.proc_root, &base, &in_the_way).to_string());
        let what = match self.placement {
            Placement::OwnLeaf => {
                format!(
                    "at start the agent moves itself into {}/{AGENT_LEAF} and enables them in {}",
                    base.display(),
                    base.display()
                )
            }
            _ => format!("at start the agent enables them down to {}, where instances go", parent.display()),
        };
        Ok(Probe {
            detail: format!("V2, memory+cpu+pids delegated to {}; {what} ({:?})", base.display(), self.placement),
            warning,
        })
    }
}

impl Delegation {
    /// `mkdir -p`, recording each dir it made. Another agent sharing an
    /// ancestor (`berth-test/` of parallel tests, `/berth` of a surge
    /// rollout) may remove it while empty, between our two mkdirs: retried.
    fn mkdir_all(&mut self, dir: &Path) -> Result<(), CgroupError> {
        let mut attempts = 0;
        'again: loop {
            let mut todo: Vec<&Path> = dir.ancestors().take_while(|a| !a.is_dir()).collect();
            todo.reverse();
            for a in todo {
                match fs::create_dir(a) {
                    Ok(()) => self.created.push(a.to_path_buf()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 5 => {
                        attempts += 1;
                        continue 'again;
                    }
                    Err(e) => return Err(CgroupError::Io { path: a.to_path_buf(), source: e }),
                }
            }
            return Ok(());
        }
    }

    /// Enables in `dir` the controllers it does not pass on yet, recording them.
    fn enable(&mut self, dir: &Path, proc_root: &Path, me: u32) -> Result<(), CgroupError> {
        let missing = missing_in(dir, "cgroup.subtree_control");
        if missing.is_empty() {
            return Ok(());
        }
        let file = dir.join("cgroup.subtree_control");
        let line: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
        let before = child_cgroups(dir, None);
        match fs::write(&file, line.join(" ")) {
            Ok(()) => {
                self.enabled.push((dir.to_path_buf(), missing, before));
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(busy(proc_root, dir, &others(dir, me))),
            Err(e) => Err(CgroupError::Io { path: file, source: e }),
        }
    }

    /// Undoes what `apply` did, last first: removes the dirs it created
    /// (when empty), disables the controllers it enabled where no child
    /// cgroup made since is left to need them, and moves the agent back to the
    /// cgroup it came from, removing its leaf. Returns what it had to leave,
    /// and why. Running it twice is harmless.
    pub fn undo(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        let leaf = self.moved.as_ref().map(|(_, _, l)| l.clone());
        for dir in self.created.iter().rev().filter(|d| Some(*d) != leaf.as_ref()) {
            // Not empty: another agent's instances or parent live there too.
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTEMPTY | libc::EBUSY)) => {}
                Err(e) => left.push(format!("{}: kept: {e}", dir.display())),
            }
        }
        for (dir, ctrls, before) in self.enabled.drain(..).rev() {
            if !dir.is_dir() {
                continue;
            }
            // A child that was there before we enabled them did without;
            // one made since may use them.
            let mut children = child_cgroups(&dir, leaf.as_deref());
            children.retain(|c| !before.contains(c));
            if !children.is_empty() {
                left.push(format!("{}: kept {ctrls:?} enabled: child cgroups {children:?} use them", dir.display()));
                continue;
            }
            let line: Vec<String> = ctrls.iter().map(|c| format!("-{c}")).collect();
            if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), line.join(" ")) {
                left.push(format!("{}: cannot disable {ctrls:?}: {e}", dir.join("cgroup.subtree_control").display()));
            }
        }
        if let Some((pid, from, leaf)) = self.moved.take() {
            match fs::write(from.join("cgroup.procs"), pid.to_string()) {
                Ok(()) => {
                    if let Err(e) = super::remove_dir(&leaf, Duration::from_secs(1)) {
                        left.push(format!("{}: kept: {e}", leaf.display()));
                    }
                }
                Err(e) => left.push(format!(
                    "cannot move the agent (pid {pid}) back to {}: {e}; it stays in {}",
                    from.display(),
                    leaf.display()
                )),
            }
        }
        self.created.clear();
        left
    }
}

impl Drop for Delegation {
    fn drop(&mut self) {
        self.undo();
    }
}

/// Names of the child cgroups of `dir`, except `skip`.
fn child_cgroups(dir: &Path, skip: Option<&Path>) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.path().is_dir() && Some(e.path().as_path()) != skip)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[cfg(test)]
mod tests;
