//! The programs an instance runs, found once, the same way for `check` and
//! `run`: the daemon, and runc, which buildkitd looks up on its own PATH
//! (`buildkit-runc`, then `runc`, as buildkit's runc executor does).
//!
//! One truth: the daemon's PATH is built here (the daemon's own dir, the
//! agent's PATH, then the usual system dirs), runc is looked up on exactly
//! that PATH, and spawn hands exactly that PATH to the daemon. So a `check`
//! that finds runc means the daemon finds it too.
//!
//! Reachability: the daemon and runc run as the instance's mapped ids, which
//! own no host file, so they meet every file as "other". A binary under a
//! 0700 dir (a home dir) passes a root's lookup and fails every instance with
//! EACCES; every dir on the way and the file itself are tested for what
//! "other" may do, on the path as given and after symlinks.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Dirs every daemon PATH ends with (the usual system dirs).
const SYSTEM_PATH: &[&str] = &["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// The names buildkitd tries for runc, in its order.
const RUNC_NAMES: &[&str] = &["buildkit-runc", "runc"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolsError {
    #[error("daemon {0:?} not found (or not a file): install buildkitd (moby/buildkit, rootless build) or pass --daemon /path/to/buildkitd; to try berth without it, use --daemon target/debug/fakekitd (see README)")]
    NoDaemon(PathBuf),
    #[error("{what} {path}: {blocker}: the instances' mapped uids meet it as \"other\" and cannot {verb} it, so every instance would fail with EACCES; {fix}")]
    Unreachable { what: &'static str, path: PathBuf, blocker: String, verb: &'static str, fix: String },
    #[error("neither buildkit-runc nor runc is on the daemon's PATH ({path}): buildkitd needs runc >= 1.1 (crun is not accepted by buildkit: it rejects `run --keep`); install it in one of those dirs or on the agent's PATH")]
    NoRunc { path: String },
}

impl ToolsError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ToolsError::NoDaemon(_) => "no_daemon",
            ToolsError::Unreachable { .. } => "unreachable",
            ToolsError::NoRunc { .. } => "no_runc",
        }
    }
}

/// What an instance runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// The daemon, absolute and without symlinks (the shim execs it from
    /// inside the instance's dir).
    pub daemon: PathBuf,
    /// The runc the daemon will find on `path`, if any.
    pub runc: Option<PathBuf>,
    /// The daemon's PATH.
    pub path: String,
}

/// Finds the daemon and runc as `run` uses them; `agent_path` is the
/// agent's own PATH. Fails on anything an instance would fail on.
pub fn resolve(flag: &Path, agent_path: Option<&OsStr>) -> Result<Tools, ToolsError> {
    let daemon = find_daemon(flag, agent_path)?;
    let path = daemon_path(&daemon, agent_path);
    let needed = needs_runc(flag) || needs_runc(&daemon);
    // Out of reach counts as missing; it is fatal only where runc is needed
    // (check says the same: fail for buildkitd, warn otherwise).
    let runc = match find_runc(&path) {
        Ok(r) => r,
        Err(e) if needed => return Err(e),
        Err(_) => None,
    };
    if runc.is_none() && needed {
        return Err(ToolsError::NoRunc { path });
    }
    Ok(Tools { daemon, runc, path })
}

/// `--daemon` looked up like execvp (a name with a slash is taken as is),
/// made absolute, and checked for reachability by the mapped ids.
pub fn find_daemon(daemon: &Path, agent_path: Option<&OsStr>) -> Result<PathBuf, ToolsError> {
    let found = if daemon.components().count() > 1 {
        daemon.is_file().then(|| daemon.to_path_buf())
    } else {
        agent_path.and_then(|p| std::env::split_paths(p).map(|d| d.join(daemon)).find(|c| c.is_file()))
    };
    let found = found.ok_or_else(|| ToolsError::NoDaemon(daemon.to_path_buf()))?;
    let abs = std::fs::canonicalize(&found).map_err(|_| ToolsError::NoDaemon(daemon.to_path_buf()))?;
    reachable("daemon", &found)?;
    reachable("daemon", &abs)?;
    Ok(abs)
}

/// buildkitd runs build steps with runc; other daemons (fakekitd) may not.
pub fn needs_runc(daemon: &Path) -> bool {
    daemon.file_name().is_some_and(|n| n.to_string_lossy().contains("buildkitd"))
}

/// The daemon's PATH: its own dir (release tarballs ship buildkit-runc
/// beside buildkitd), the agent's absolute PATH entries, the system dirs.
pub fn daemon_path(daemon: &Path, agent_path: Option<&OsStr>) -> String {
    let mut dirs: Vec<PathBuf> = daemon.parent().map(Path::to_path_buf).into_iter().collect();
    dirs.extend(agent_path.map(|p| std::env::split_paths(p).collect::<Vec<_>>()).unwrap_or_default());
    dirs.extend(SYSTEM_PATH.iter().map(PathBuf::from));
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        // A relative entry would resolve against the daemon's cwd, not ours.
        if d.is_absolute() && !out.contains(&d) {
            out.push(d);
        }
    }
    std::env::join_paths(out).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
}

/// runc as the daemon finds it on `path`: the first name that exists in
/// some dir, skipping copies the mapped ids cannot reach (as Go's LookPath
/// skips what it cannot stat). A copy found only out of reach is an error
/// that names the blocking dir.
pub fn find_runc(path: &str) -> Result<Option<PathBuf>, ToolsError> {
    let mut out_of_reach = None;
    for name in RUNC_NAMES {
        for dir in std::env::split_paths(path) {
            let c = dir.join(name);
            if !c.is_file() {
                continue;
            }
            match reachable("runc", &c).and_then(|()| {
                let abs = std::fs::canonicalize(&c).unwrap_or(c.clone());
                reachable("runc", &abs)
            }) {
                Ok(()) => return Ok(Some(c)),
                Err(e) => {
                    out_of_reach.get_or_insert(e);
                }
            }
        }
    }
    out_of_reach.map_or(Ok(None), Err)
}

/// Can a process that owns none of the host's files exec `file`? Every
/// ancestor dir needs o+x; the file o+x, and o+r as well for a script (its
/// interpreter reads it). Symlinks on the way are followed by `metadata`.
pub fn reachable(what: &'static str, file: &Path) -> Result<(), ToolsError> {
    let unreachable = |blocker: String, verb: &'static str, fix: String| ToolsError::Unreachable {
        what,
        path: file.to_path_buf(),
        blocker,
        verb,
        fix,
    };
    let mut dirs: Vec<&Path> = file.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()).collect();
    dirs.reverse();
    for dir in dirs {
        let Ok(meta) = std::fs::metadata(dir) else { continue };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o001 == 0 {
            return Err(unreachable(
                format!("{} has mode {mode:o}", dir.display()),
                "search",
                format!(
                    "move it to a directory every user can search (such as /usr/local/bin), or run chmod o+x {}",
                    dir.display()
                ),
            ));
        }
    }
    let Ok(meta) = std::fs::metadata(file) else { return Ok(()) };
    let mode = meta.permissions().mode() & 0o7777;
    let script = std::fs::read(file).map(|b| b.starts_with(b"#!")).unwrap_or(false);
    let need = if script { 0o005 } else { 0o001 };
    if mode & need != need {
        let (verb, bits) = if script { ("read and execute", "o+rx") } else { ("execute", "o+x") };
        return Err(unreachable(format!("it has mode {mode:o}"), verb, format!("run chmod {bits} {}", file.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
        t
    }

    fn exe(path: &Path, mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, "#!/bin/sh\necho 'runc version 1.1.12'\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn daemon_path_keeps_its_dir_the_agents_path_and_system_dirs_once() {
        let p = daemon_path(Path::new("/opt/bk/bin/buildkitd"), Some(OsStr::new("/x/bin:rel:/usr/bin:/opt/bk/bin")));
        assert_eq!(p, "/opt/bk/bin:/x/bin:/usr/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/sbin:/bin");
    }

    #[test]
    fn runc_is_found_on_the_daemon_path_buildkit_runc_first() {
        let t = tree();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        exe(&a.join("runc"), 0o755);
        let path = format!("{}:{}", a.display(), b.display());
        assert_eq!(find_runc(&path).unwrap(), Some(a.join("runc")));
        exe(&b.join("buildkit-runc"), 0o755);
        assert_eq!(find_runc(&path).unwrap(), Some(b.join("buildkit-runc")));
    }

    #[test]
    fn runc_under_a_private_dir_is_an_error_naming_the_dir_unless_a_reachable_one_exists() {
        let t = tree();
        let home = t.path().join("home");
        exe(&home.join("bin/runc"), 0o755);
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
        let path = home.join("bin").display().to_string();
        let e = find_runc(&path).unwrap_err().to_string();
        assert!(e.contains(&format!("{} has mode 700", home.display())) && e.contains("EACCES"), "{e}");
        assert!(e.contains(&format!("chmod o+x {}", home.display())), "{e}");
        let public = t.path().join("pub");
        exe(&public.join("runc"), 0o755);
        let both = format!("{path}:{}", public.display());
        assert_eq!(find_runc(&both).unwrap(), Some(public.join("runc")), "the daemon skips what it cannot reach");
    }

    #[test]
    fn a_script_needs_read_and_execute_for_others() {
        let t = tree();
        let f = t.path().join("bin/runc");
        exe(&f, 0o751);
        let e = reachable("runc", &f).unwrap_err().to_string();
        assert!(e.contains("mode 751") && e.contains("chmod o+rx"), "{e}");
        exe(&f, 0o755);
        reachable("runc", &f).unwrap();
    }

    #[test]
    fn buildkitd_without_runc_is_refused_other_daemons_are_not() {
        let t = tree();
        let d = t.path().join("bin/buildkitd");
        exe(&d, 0o755);
        let empty = Some(OsStr::new(""));
        // The system dirs may hold a runc on some machines; only assert the
        // refusal where none is installed.
        if find_runc(&daemon_path(&d, empty)).unwrap().is_none() {
            assert!(matches!(resolve(&d, empty), Err(ToolsError::NoRunc { .. })));
        } else {
            eprintln!("SKIPPED: part of buildkitd_without_runc_is_refused: a runc is installed in a system dir");
        }
        let f = t.path().join("bin/fakekitd");
        exe(&f, 0o755);
        let tools = resolve(&f, empty).unwrap();
        assert_eq!(tools.daemon, f.canonicalize().unwrap());
        assert!(tools.path.starts_with(&t.path().join("bin").display().to_string()));
    }

    #[test]
    fn a_daemon_under_a_private_dir_is_refused() {
        let t = tree();
        let home = t.path().join("home");
        let d = home.join("bin/fakekitd");
        exe(&d, 0o755);
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
        let e = find_daemon(&d, None).unwrap_err();
        assert_eq!(e.metric_label(), "unreachable");
        assert!(e.to_string().contains(&format!("{} has mode 700", home.display())), "{e}");
    }
}
