//! The binaries the bench runs and small `/proc` readers (memory, CPU time,
//! children, load).

use super::*;

pub struct Bins {
    pub agent: PathBuf,
    pub shim: PathBuf,
    pub fakekitd: PathBuf,
}

impl Bins {
    /// The binaries beside the running `berth-bench` (or `$BERTH_BIN_DIR`).
    pub fn find() -> Result<Bins> {
        let dir = harness::bin_dir();
        let get = |n: &str| -> Result<PathBuf> {
            let p = dir.join(n);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{n} not found at {}: build with `cargo build --release --workspace --bins` \
                     (the profile of berth-bench), or set BERTH_BIN_DIR",
                    p.display()
                )
            }
        };
        Ok(Bins { agent: get("berth-agent")?, shim: get("berth-shim")?, fakekitd: get("fakekitd")? })
    }
}

/// `VmRSS` (or another `status` field given in kB) of `pid`, in bytes.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Proportional set size (shared pages divided among their users), bytes.
pub fn pss(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

pub fn rss(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS")
}

/// (ppid, comm) of `pid`.
pub fn stat_of(pid: u32) -> Option<(u32, String)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let ppid = s[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
    Some((ppid, comm))
}

/// User+system CPU time of `pid` so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = s.rfind(')')?;
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    // After ")": state(0) ppid(1) ... utime(11) stime(12).
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100).max(1) as u64;
    Some(Duration::from_secs_f64((ut + st) as f64 / hz as f64))
}

/// Context switches (voluntary + involuntary) of all of `pid`'s threads so
/// far: each wake-up of a relay or an end shows here.
pub fn switches(pid: u32) -> Option<u64> {
    let mut sum = 0;
    for e in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(s) = fs::read_to_string(e.path().join("status")) else { continue };
        for l in s.lines() {
            if let Some(v) =
                l.strip_prefix("voluntary_ctxt_switches:").or(l.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                sum += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Some(sum)
}

/// Children of `parent` whose comm is `comm`.
pub fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            if let Some((pp, c)) = stat_of(pid) {
                if pp == parent && c == comm {
                    out.push(pid);
                }
            }
        }
    }
    out
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// A fresh dir under the system temp dir (mode 0755: mapped uids traverse it),
/// removed by the returned guard.
pub fn temp_dir(prefix: &str) -> Result<(PathBuf, UndoGuard)> {
    let t = tempfile::Builder::new().prefix(prefix).tempdir().context("temp dir")?;
    let dir = t.keep();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    let dir = dir.canonicalize()?;
    let g = register(Undo::Dir(dir.clone()));
    Ok((dir, g))
}
