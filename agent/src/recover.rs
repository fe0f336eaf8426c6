//! Recovery: on start, sweep what an earlier agent left. Every instance dir
//! is handed to `berth-shim delete`, which works from the dir's files alone;
//! then leases and cgroups that no instance dir names are removed too (a
//! crash can fall between creating one and recording it).

use crate::Ctx;
use berth_shim::spec::Outcome;
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;
use tokio::process::Command;
use tracing::{error, info, warn};

/// How long a lease may exist without its instance dir before it is stale.
const LEASE_GRACE: Duration = Duration::from_secs(60);

/// Runs `berth-shim delete <dir>` and returns its outcome.
pub async fn delete(ctx: &Ctx, dir: &Path) -> Option<Outcome> {
    let out =
        Command::new(&ctx.shim).arg("delete").arg(dir).arg("--proc-root").arg(&ctx.run.host.proc_root).output().await;
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let outcome = text.lines().rev().find_map(|l| serde_json::from_str::<Outcome>(l).ok());
            if outcome.is_none() {
                error!(dir = %dir.display(), status = ?out.status, stderr = %String::from_utf8_lossy(&out.stderr), "berth-shim delete gave no outcome");
            }
            outcome
        }
        Err(e) => {
            error!(dir = %dir.display(), shim = %ctx.shim.display(), error = %e, "cannot run berth-shim delete");
            None
        }
    }
}

/// What the sweep found and removed.
#[derive(Debug, Default)]
pub struct Swept {
    pub instances: usize,
    /// Trash entries emptied.
    pub trash: usize,
    /// Instances of live agents, left alone.
    pub skipped: usize,
    pub leases: usize,
    /// Host-side veths of dead instances.
    pub links: usize,
    pub cgroups: usize,
    /// Instance-like cgroups with processes that no instance dir names.
    pub foreign: usize,
    /// Spare disk images of dead agents (see `disk::spares`).
    pub spares: usize,
    pub failures: usize,
}

pub async fn sweep(ctx: &Ctx) -> Swept {
    let mut swept = Swept::default();
    let mut seen = HashSet::new();
    if let Ok(rd) = std::fs::read_dir(ctx.instances_dir()) {
        for entry in rd.flatten() {
            let dir = entry.path();
            let id = entry.file_name().to_string_lossy().to_string();
            if id.starts_with(berth_shim::teardown::TRASH_PREFIX) {
                // A shim died while emptying it: nothing runs there any more.
                let path = dir.clone();
                match tokio::task::spawn_blocking(move || berth_shim::wipe::remove_tree(&path)).await {
                    Ok(Ok(())) => swept.trash += 1,
                    Ok(Err(e)) => {
                        error!(dir = %dir.display(), error = %e, "cannot empty a trash entry");
                        swept.failures += 1;
                    }
                    Err(e) => error!(error = %e, "trash removal task failed"),
                }
                continue;
            }
            seen.insert(id.clone());
            // Another live agent's instance (a rollout's old or new agent).
            let owner = berth_shim::spec::Spec::load(&dir).map(|s| s.owner).unwrap_or_default();
            if owner == ctx.owner.id || crate::owner::alive(&ctx.run.host.state_dir, &owner) {
                swept.skipped += 1;
                continue;
            }
            match delete(ctx, &dir).await {
                Some(o) if o.leftovers.is_empty() => {
                    info!(instance = %id, peak_memory = o.peak_memory, oom_killed = o.oom_kills > 0, "swept instance left by an earlier agent");
                    swept.instances += 1;
                }
                Some(o) => {
                    error!(instance = %id, leftovers = %o.leftovers.join("; "), "sweep could not remove everything");
                    swept.failures += 1;
                }
                None => swept.failures += 1,
            }
        }
    }
    for (path, content) in ctx.pool.leases() {
        // A lease reads "<instance id> <owner agent id>". A live agent
        // writes it a moment before the instance dir, so a lease without a
        // dir is stale only when its owner is dead, or (a lease of unknown
        // owner) when it is older than that window.
        let mut words = content.split_whitespace();
        let (id, owner) = (words.next().unwrap_or(""), words.next());
        let young = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default() < LEASE_GRACE)
            .unwrap_or(false);
        let owner_alive = match owner {
            Some(o) => o == ctx.owner.id || crate::owner::alive(&ctx.run.host.state_dir, o),
            None => young,
        };
        if !owner_alive && !ctx.instances_dir().join(id).exists() {
            match std::fs::remove_file(&path) {
                Ok(()) => swept.leases += 1,
                Err(e) => warn!(lease = %path.display(), error = %e, "cannot remove stale lease"),
            }
        }
    }
    for cg in ctx.layout.children("berth-") {
        let id =
            cg.file_name().map(|n| n.to_string_lossy().trim_start_matches("berth-").to_string()).unwrap_or_default();
        // Only names berth gives (berth-<12 hex>): never a parent such as
        // berth-test, nor another tool's cgroup.
        let ours = id.len() == 12 && id.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
        if !ours || ctx.instances_dir().join(&id).exists() {
            continue;
        }
        // No instance dir of ours names it. Every instance dir is written
        // before its cgroup, so this is either a leftover whose dir is gone
        // or the live instance of another agent sharing the cgroup parent
        // (with another state dir). Only an empty one is ours to remove:
        // processes in it are never killed on a guess.
        let spec = berth_shim::spec::CgroupSpec { version: ctx.layout.version, dirs: vec![("any".into(), cg.clone())] };
        let procs = berth_shim::cgroup::procs(&spec);
        if !procs.is_empty() {
            warn!(cgroup = %cg.display(), ?procs, "cgroup named like a berth instance but unknown to this state dir, with processes: left alone (another agent's?)");
            swept.foreign += 1;
            continue;
        }
        match berth_shim::cgroup::remove_dir(&cg, Duration::from_secs(2)) {
            Ok(()) => swept.cgroups += 1,
            Err(e) => {
                error!(cgroup = %cg.display(), error = %e, "cannot remove stale cgroup");
                swept.failures += 1;
            }
        }
    }
    // Subnet leases and host-side veths of dead agents (see `network`).
    if let Some(n) = &ctx.network {
        let state = &ctx.run.host.state_dir;
        let alive = |o: &str| o == ctx.owner.id || crate::owner::alive(state, o);
        let (leases, links) = n.sweep(&ctx.instances_dir(), alive).await;
        swept.leases += leases;
        swept.links += links;
    }
    // Spare disk images of dead agents (their loop devices went with them).
    {
        let state = &ctx.run.host.state_dir;
        swept.spares = berth_shim::disk::spare::sweep(state, |o| o == ctx.owner.id || crate::owner::alive(state, o));
    }
    crate::owner::sweep_dead(&ctx.run.host.state_dir, &ctx.owner.id);
    info!(
        instances = swept.instances,
        spares = swept.spares,
        skipped = swept.skipped,
        trash = swept.trash,
        leases = swept.leases,
        links = swept.links,
        cgroups = swept.cgroups,
        foreign = swept.foreign,
        failures = swept.failures,
        "start-up sweep done"
    );
    swept
}

/// Instance dirs on disk whose client is `key`, whoever owns them.
pub fn instances_of(ctx: &Ctx, key: &str) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(ctx.instances_dir()) else { return Vec::new() };
    rd.flatten()
        .map(|e| e.path())
        .filter(|d| !d.file_name().is_some_and(|n| n.to_string_lossy().starts_with(berth_shim::teardown::TRASH_PREFIX)))
        .filter(|d| berth_shim::spec::Spec::load(d).map(|s| s.client_key == key).unwrap_or(false))
        .collect()
}
