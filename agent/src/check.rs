//! `berth-agent check`: can this node run berth? One screen, one line per
//! prerequisite, and for each missing piece the fix. Exits 1 if any fails.
//!
//! Every probe reads the host through the configurable roots (`--proc-root`,
//! `--cgroup-root`, `--etc-root`, `--state-dir`), so the tests run it on
//! fake host trees; the user-namespace clone probe runs only against the
//! real /proc.

mod cgmove;
mod network;

use crate::config::CheckArgs;
use crate::idmap::IdPool;
use crate::run::find_shim;
use crate::spawn::tools::{self, ToolsError};
use berth_shim::cgroup::{delegate, CgroupError};
use std::ffi::OsStr;
use std::fmt;
use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Works, at a cost worth knowing, with the way to avoid it.
    Info,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    pub fix: Option<String>,
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag}  {:<16} {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      {:<16} fix: {fix}", "")?;
        }
        Ok(())
    }
}

fn ok(name: &'static str, detail: impl Into<String>) -> Item {
    Item { name, level: Level::Ok, detail: detail.into(), fix: None }
}
fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Item {
    Item { name, level: Level::Fail, detail: detail.into(), fix: Some(fix.into()) }
}
fn info(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Item {
    Item { name, level: Level::Info, detail: detail.into(), fix: Some(fix.into()) }
}
fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Item {
    Item { name, level: Level::Warn, detail: detail.into(), fix: Some(fix.into()) }
}

pub fn main(args: &CheckArgs) -> i32 {
    let items = run_checks(args);
    println!("berth-agent check on node {}", crate::run::node_name());
    for i in &items {
        println!("{i}");
    }
    let failed = items.iter().filter(|i| i.level == Level::Fail).count();
    if failed > 0 {
        println!("{failed} check(s) failed: berth cannot run builds on this node until they are fixed");
        1
    } else {
        println!("this node can run berth");
        0
    }
}

pub fn run_checks(args: &CheckArgs) -> Vec<Item> {
    let h = &args.host;
    let real_proc = h.proc_root == Path::new("/proc");
    let agent_path = std::env::var_os("PATH");
    let mut items = vec![
        userns(&h.proc_root, real_proc, h.shim.as_deref()),
        overlay(&h.state_dir, real_proc, h.shim.as_deref()),
        proc_unmasked(&h.proc_root),
        idmap(args),
        cgroups(args),
        cgmove::check(&h.cgroup_root, &h.proc_root),
        daemon(&h.daemon, agent_path.as_deref()),
        runc(&h.daemon, agent_path.as_deref()),
        state_dir(&h.state_dir),
        disk::check(&h.state_dir, args.limits.build_disk, real_proc, h.shim.as_deref()),
    ];
    items.extend(network::checks(&args.net, &h.proc_root));
    // bkconfig (issue 16): the fragment, validated as `run` validates it.
    items.extend(args.buildkitd_config.as_deref().map(|p| buildkitd_config(p, args.limits.build_disk)));
    items
}

/// `--buildkitd-config`: loaded exactly as `run` loads it at start.
fn buildkitd_config(path: &Path, build_disk: u64) -> Item {
    const N: &str = "buildkitd config";
    match crate::bkconfig::load(path, crate::spawn::gc_budget(build_disk)) {
        Ok(f) => {
            let mut detail =
                format!("{}: sha256 {}, {} file(s) to copy", path.display(), f.short_hash(), f.files.len());
            for c in &f.clamped {
                detail.push_str(&format!("; {c}"));
            }
            ok(N, detail)
        }
        Err(e) => fail(N, e.to_string(), crate::bkconfig::fix(&e)),
    }
}

fn userns(proc_root: &Path, real: bool, shim: Option<&Path>) -> Item {
    const N: &str = "user namespaces";
    let file = proc_root.join("sys/user/max_user_namespaces");
    let max: u64 = match std::fs::read_to_string(&file) {
        Ok(s) => s.trim().parse().unwrap_or(0),
        Err(e) => return fail(N, format!("{}: {e}", file.display()), "use a kernel built with CONFIG_USER_NS=y"),
    };
    if max == 0 {
        return fail(
            N,
            "user.max_user_namespaces is 0",
            "sysctl -w user.max_user_namespaces=15000 (and persist it in /etc/sysctl.d)",
        );
    }
    if max < 64 {
        return warn(
            N,
            format!("user.max_user_namespaces is {max}: it caps concurrent builds"),
            "sysctl -w user.max_user_namespaces=15000",
        );
    }
    if !real {
        return ok(N, format!("max_user_namespaces={max} (clone probe skipped: --proc-root is not /proc)"));
    }
    let shim = match find_shim(shim) {
        Ok(s) => s,
        Err(e) => return fail(N, e.to_string(), "install berth-shim beside berth-agent"),
    };
    match Command::new(&shim).arg("probe-userns").output() {
        Ok(o) if o.status.success() => ok(N, format!("max_user_namespaces={max}, clone of user+mount+pid namespaces with a fresh /proc works")),
        Ok(o) => fail(
            N,
            format!("clone probe failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
            "run the agent as root with CAP_SYS_ADMIN (privileged container); check seccomp/AppArmor policies that block unshare(CLONE_NEWUSER)",
        ),
        Err(e) => fail(N, format!("{}: {e}", shim.display()), "install berth-shim beside berth-agent"),
    }
}

/// buildkit's overlay snapshotter mounts overlayfs from inside the user
/// namespace, on the state dir's filesystem: kernel >= 5.11, and not on top
/// of another overlayfs. Tried for real with `berth-shim probe-userns <dir>`.
fn overlay(state: &Path, real: bool, shim: Option<&Path>) -> Item {
    const N: &str = "overlayfs";
    if !real {
        return ok(N, "probe skipped: --proc-root is not /proc");
    }
    let shim = match find_shim(shim) {
        Ok(s) => s,
        Err(e) => return fail(N, e.to_string(), "install berth-shim beside berth-agent"),
    };
    if let Err(e) = std::fs::create_dir_all(state) {
        return fail(N, format!("{}: {e}", state.display()), "create the state dir");
    }
    let dir = state.join(format!(".berth-check-overlay-{}", std::process::id()));
    let res = Command::new(&shim).arg("probe-userns").arg(&dir).output();
    let _ = std::fs::remove_dir_all(&dir);
    match res {
        Ok(o) if o.status.success() => ok(N, format!("mounts in a user namespace on {}", state.display())),
        Ok(o) => warn(
            N,
            format!("no overlayfs in a user namespace on {}: {}", state.display(), String::from_utf8_lossy(&o.stderr).trim()),
            "put --state-dir on ext4/xfs with kernel >= 5.11; without it buildkit falls back to the slower native snapshotter",
        ),
        Err(e) => fail(N, format!("{}: {e}", shim.display()), "install berth-shim beside berth-agent"),
    }
}

/// A container runtime masks /proc paths by mounting over them; the kernel
/// then refuses a fresh proc mount in a user namespace ("mnt_too_revealing").
fn proc_unmasked(proc_root: &Path) -> Item {
    const N: &str = "/proc unmasked";
    let file = proc_root.join("self/mountinfo");
    let Ok(text) = std::fs::read_to_string(&file) else {
        return fail(N, format!("cannot read {}", file.display()), "mount procfs at /proc");
    };
    let masked: Vec<String> = berth_shim::mountinfo::parse(&text)
        .into_iter()
        // Below /proc, not /proc itself (Path::starts_with compares components).
        .filter(|m| m.mount_point.starts_with("/proc") && m.mount_point != Path::new("/proc"))
        .map(|m| m.mount_point.display().to_string())
        .collect();
    if masked.is_empty() {
        ok(N, "nothing is mounted over /proc paths")
    } else {
        fail(
            N,
            format!("mounts over {} hide parts of /proc: {}", masked.len(), masked.join(" ")),
            "run the agent container privileged (the chart does), or with securityContext.procMount: Unmasked",
        )
    }
}

fn idmap(args: &CheckArgs) -> Item {
    const N: &str = "id-map pool";
    let h = &args.host;
    let scratch = std::env::temp_dir().join(format!("berth-check-leases-{}", std::process::id()));
    let res = IdPool::new(h.idmap_base, h.idmap_count, scratch.clone(), &h.etc_root);
    let _ = std::fs::remove_dir_all(&scratch);
    match res {
        Ok(pool) => {
            let end = h.idmap_base as u64 + h.idmap_count as u64;
            let mut item = ok(
                N,
                format!(
                    "ids {}..{} ({} ranges of 65536), clear of host users and groups",
                    h.idmap_base,
                    end,
                    pool.capacity()
                ),
            );
            if let Some(clash) = subid_overlap(&h.etc_root, h.idmap_base as u64, end) {
                item = warn(
                    N,
                    format!("{}; but {clash}", item.detail),
                    "move --idmap-base past the /etc/subuid and /etc/subgid ranges of other tools",
                );
            }
            item
        }
        Err(e) => {
            fail(N, e.to_string(), "set --idmap-base above every host uid/gid and --idmap-count to a multiple of 65536")
        }
    }
}

/// An /etc/subuid or /etc/subgid entry that overlaps the pool: another tool
/// (rootless podman, say) could hand out the same host ids.
fn subid_overlap(etc: &Path, start: u64, end: u64) -> Option<String> {
    for file in ["subuid", "subgid"] {
        let text = std::fs::read_to_string(etc.join(file)).ok()?;
        for line in text.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if let [who, base, count] = f[..] {
                let (Ok(b), Ok(c)) = (base.parse::<u64>(), count.parse::<u64>()) else {
                    continue;
                };
                if b < end && start < b + c {
                    return Some(format!("/etc/{file} gives {who} {b}..{} inside the pool", b + c));
                }
            }
        }
    }
    None
}

/// Probes in a throwaway child cgroup, removed again; never moves a process
/// nor enables a controller, so running it beside a live agent (or twice)
/// leaves the tree as it was.
fn cgroups(args: &CheckArgs) -> Item {
    const N: &str = "cgroups";
    let h = &args.host;
    let fix =
        "run with the cgroup filesystem mounted read-write (privileged), or pass --cgroup-parent to a delegated cgroup";
    let probe = delegate::plan(&h.cgroup_root, &h.proc_root, h.cgroup_parent.as_deref())
        .and_then(|plan| plan.probe(&args.limits.limits()));
    match probe {
        Ok(delegate::Probe { detail, warning: None }) => ok(N, detail),
        Ok(delegate::Probe { detail, warning: Some(w) }) => warn(N, detail, w),
        Err(e @ CgroupError::Busy { .. }) => fail(N, e.to_string(), fix),
        Err(e) => fail(N, format!("cannot create a limited cgroup: {e}"), fix),
    }
}

fn daemon(daemon: &Path, agent_path: Option<&OsStr>) -> Item {
    const N: &str = "daemon";
    // The lookup and reachability test `run` makes (spawn::tools).
    let path = match tools::find_daemon(daemon, agent_path) {
        Ok(p) => p,
        Err(e @ ToolsError::NoDaemon(_)) => {
            return fail(
                N,
                e.to_string(),
                "install buildkitd (the berth image ships it) or pass --daemon /path/to/buildkitd",
            )
        }
        Err(e) => return fail(N, e.to_string(), REACH_FIX),
    };
    match Command::new(&path).arg("--version").output() {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout);
            ok(N, format!("{}: {}", path.display(), v.lines().next().unwrap_or("").trim()))
        }
        Ok(o) => fail(N, format!("{} --version exited with {}", path.display(), o.status), "reinstall the daemon"),
        Err(e) => fail(N, format!("{}: {e}", path.display()), "make the daemon binary executable"),
    }
}

const REACH_FIX: &str =
    "install it where every user can search each directory on the way (such as /usr/local/bin), or chmod o+x those directories";

/// runc as the daemon will find it: on the PATH spawn gives the daemon, out
/// of the mapped ids' reach counted as missing. buildkitd runs build steps
/// with runc; Debian's crun rejects `run --keep`.
fn runc(daemon: &Path, agent_path: Option<&OsStr>) -> Item {
    const N: &str = "runc";
    let resolved = tools::find_daemon(daemon, agent_path).unwrap_or_default();
    let path = tools::daemon_path(&resolved, agent_path);
    let needed = tools::needs_runc(daemon) || tools::needs_runc(&resolved);
    let missing = |detail: String, fix: &str| {
        if needed {
            fail(N, detail, fix)
        } else {
            warn(N, format!("{detail} (not needed by {})", daemon.display()), fix)
        }
    };
    match tools::find_runc(&path) {
        Ok(Some(p)) => {
            let v = Command::new(&p).arg("--version").output().ok();
            let first = v
                .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
                .unwrap_or_default();
            ok(N, format!("{}: {first} (the daemon's PATH: {path})", p.display()))
        }
        Ok(None) => missing(
            ToolsError::NoRunc { path }.to_string(),
            "install runc >= 1.1 (crun is not accepted by buildkit: it rejects `run --keep`)",
        ),
        Err(e) => missing(e.to_string(), REACH_FIX),
    }
}

fn state_dir(state: &Path) -> Item {
    const N: &str = "state dir";
    let fix = "put --state-dir on a local ext4/xfs/btrfs disk (a hostPath), not on overlayfs";
    if let Err(e) = std::fs::create_dir_all(state) {
        return fail(N, format!("{}: {e}", state.display()), fix);
    }
    if let Err(e) = crate::sys::check_traversable(state) {
        return fail(N, e, "chmod o+x on each parent dir");
    }
    let probe = state.join(format!(".berth-check-{}", std::process::id()));
    if let Err(e) = std::fs::write(&probe, b"x") {
        return fail(N, format!("{} is not writable: {e}", state.display()), fix);
    }
    let _ = std::fs::remove_file(&probe);
    match crate::sys::fs_type(state) {
        Ok(t) if t == "overlayfs" => fail(
            N,
            format!("{} is on overlayfs: buildkit's overlay snapshotter cannot nest on it", state.display()),
            fix,
        ),
        Ok(t) if t == "tmpfs" => {
            warn(N, format!("{} is on tmpfs: build state counts against node memory", state.display()), fix)
        }
        Ok(t) => ok(N, format!("{} on {t}, writable", state.display())),
        Err(e) => warn(N, format!("statfs {}: {e}", state.display()), fix),
    }
}

mod disk;
#[cfg(test)]
mod tests;
