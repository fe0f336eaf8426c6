//! The leak scan (invariant 1): processes, mounts, cgroups, files and
//! leases an agent's scope could leave behind, and the cleanup after a test.

use super::*;

/// What a leak scan looks at: one agent's temp dir, state dir and cgroup parent.
#[derive(Debug, Clone)]
pub struct LeakScope {
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub cgroup_root: PathBuf,
    /// Relative, e.g. `berth-test/x-123-0`.
    pub cgroup_parent: String,
}

/// `(controller list, path)` entries of `/proc/<pid>/cgroup`.
pub(crate) fn proc_cgroups(pid: &str) -> Vec<(String, String)> {
    let entries = berth_shim::cgroup::proc_cgroups(Path::new("/proc"), pid).unwrap_or_default();
    entries.into_iter().map(|e| (e.controllers, e.path)).collect()
}

/// The dirs our cgroup parent can be at: `<hierarchy>/<parent>` (where the
/// agent puts it with `--cgroup-parent`) and `<hierarchy>/<own cgroup>/<parent>`,
/// for every v1 hierarchy, or the v2 root on a pure v2 host.
pub fn cgroup_parent_dirs(root: &Path, parent: &str) -> Vec<PathBuf> {
    let own = proc_cgroups("self");
    let parent = parent.trim_start_matches('/');
    let mut out = BTreeSet::new();
    let mut add = |h: &Path, own_path: Option<&str>| {
        out.insert(h.join(parent));
        if let Some(o) = own_path {
            let o = o.trim_start_matches('/');
            if !o.is_empty() {
                out.insert(h.join(o).join(parent));
            }
        }
    };
    if root.join("cgroup.controllers").exists() {
        let o = own.iter().find(|(c, _)| c.is_empty()).map(|(_, p)| p.as_str());
        add(root, o);
    } else if let Ok(rd) = fs::read_dir(root) {
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue; // co-mount aliases (cpu -> cpu,cpuacct) are symlinks
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let o = own.iter().find(|(c, _)| match name.as_str() {
                "unified" => c.is_empty(),
                n => {
                    let mut a: Vec<&str> = c.split(',').map(|x| x.trim_start_matches("name=")).collect();
                    let mut b: Vec<&str> = n.split(',').collect();
                    a.sort_unstable();
                    b.sort_unstable();
                    a == b
                }
            });
            add(&e.path(), o.map(|(_, p)| p.as_str()));
        }
    }
    out.into_iter().collect()
}

/// Every dir below `dir`, deepest first.
pub(crate) fn subdirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                    out.push(e.path());
                }
            }
        }
    }
    walk(dir, &mut out);
    out
}

pub(crate) fn cgroup_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

pub(crate) fn cmdline(pid: &str) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

/// Processes that belong to the scope: their command line names the temp
/// dir, or they sit in a cgroup below the parent. fakeclient processes (test
/// clients, not instance leftovers) and `exclude` are skipped.
pub(crate) fn scope_processes(scope: &LeakScope, exclude: &[u32]) -> Vec<(u32, String)> {
    let dir = scope.dir.to_string_lossy().into_owned();
    let parent = format!("/{}", scope.cgroup_parent.trim_matches('/'));
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        if exclude.contains(&pid) {
            continue;
        }
        let Some(argv) = cmdline(&name) else { continue };
        if argv.first().is_some_and(|a| Path::new(a).file_name() == Some(OsStr::new("fakeclient"))) {
            continue;
        }
        let joined = argv.join(" ");
        let why = if joined.contains(&dir) {
            Some("command line names the test dir".to_string())
        } else {
            proc_cgroups(&name)
                .into_iter()
                .find(|(_, p)| {
                    p == &parent || p.starts_with(&format!("{parent}/")) || p.contains(&format!("{parent}/"))
                })
                .map(|(c, p)| format!("in cgroup {c}:{p}"))
        };
        if let Some(why) = why {
            out.push((pid, format!("process {pid} ({}) still running: {why}", truncate(&joined, 200))));
        }
    }
    out
}

pub(crate) fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut k = n;
        while !s.is_char_boundary(k) {
            k -= 1;
        }
        format!("{}...", &s[..k])
    }
}

/// Mount points (in this process's mount namespace) under `dir`, in mount order.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mounts = berth_shim::mountinfo::read(Path::new("/proc")).unwrap_or_default();
    mounts.into_iter().map(|m| m.mount_point).filter(|p| p.starts_with(dir)).collect()
}

/// Every non-dir entry below `dir` (not following symlinks).
pub(crate) fn files_below(dir: &Path, out: &mut Vec<(PathBuf, fs::FileType)>) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                files_below(&e.path(), out);
            } else {
                out.push((e.path(), ft));
            }
        }
    }
}

/// Scans for what an instance could leave: processes (command line naming
/// the temp dir, or in a cgroup below the parent; `exclude` and fakeclient
/// runs skipped), cgroup dirs below the parent in every hierarchy, mounts
/// under the temp dir, entries of `<state>/instances`, files under
/// `<state>/leases`, and socket files under the state dir.
pub fn leak_scan(scope: &LeakScope, exclude: &[u32]) -> Vec<String> {
    let mut out: Vec<String> = scope_processes(scope, exclude).into_iter().map(|(_, s)| s).collect();

    for parent in cgroup_parent_dirs(&scope.cgroup_root, &scope.cgroup_parent) {
        for d in subdirs_deepest_first(&parent) {
            let procs = cgroup_procs(&d);
            out.push(if procs.is_empty() {
                format!("cgroup left: {}", d.display())
            } else {
                format!("cgroup left: {} (procs {procs:?})", d.display())
            });
        }
    }

    for m in mounts_under(&scope.dir) {
        out.push(format!("mount left: {}", m.display()));
    }
    // Disk hook: loop devices bound to images below the scope.
    out.extend(crate::disk_leaks::scan(&scope.dir));

    if let Ok(rd) = fs::read_dir(scope.state_dir.join("instances")) {
        for e in rd.flatten() {
            out.push(format!("instance entry left: {}", e.path().display()));
        }
    }

    let mut leases = Vec::new();
    files_below(&scope.state_dir.join("leases"), &mut leases);
    for (p, _) in leases {
        out.push(format!("lease file left: {}", p.display()));
    }

    let mut files = Vec::new();
    files_below(&scope.state_dir, &mut files);
    for (p, ft) in files {
        if ft.is_socket() {
            out.push(format!("socket left: {}", p.display()));
        }
    }
    out
}

/// Best-effort removal of everything in the scope: kills its processes,
/// detaches its mounts, empties and removes its cgroups (including the parent
/// dir itself, and `berth-test` when it is empty).
pub fn cleanup(scope: &LeakScope) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let me = [std::process::id()];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let procs = scope_processes(scope, &me);
        if procs.is_empty() || Instant::now() >= deadline {
            break;
        }
        for (pid, _) in procs {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    for m in mounts_under(&scope.dir).into_iter().rev() {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    crate::disk_leaks::cleanup(&scope.dir);

    for parent in cgroup_parent_dirs(&scope.cgroup_root, &scope.cgroup_parent) {
        if !parent.exists() {
            continue;
        }
        let mut dirs = subdirs_deepest_first(&parent);
        dirs.push(parent.clone());
        for d in dirs {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                for pid in cgroup_procs(&d) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => {
                        eprintln!("harness: cannot remove cgroup {}: {e}", d.display());
                        break;
                    }
                }
            }
        }
        // The shared first component (`berth-test`): only when empty; other
        // tests running in parallel may still use it.
        let mut up = parent.parent();
        let depth = Path::new(&scope.cgroup_parent).components().count();
        for _ in 1..depth {
            match up {
                Some(p) => {
                    if fs::remove_dir(p).is_err() {
                        break;
                    }
                    up = p.parent();
                }
                None => break,
            }
        }
    }
}
