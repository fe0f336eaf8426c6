//! Ending an instance, shared by `run` (our own child) and `delete` (pids
//! from files): stop the daemon, empty and remove the cgroup, unmount and
//! wipe the instance dir, release the veth, subnet and id lease, in that order so that each
//! step only removes what nothing alive can still use.
//!
//! Every step that fails leaves a line naming its path or pid in
//! `Outcome.leftovers`, and the next step still runs: a half-done teardown
//! that reports exactly what is left beats one that stops at the first error.

pub mod mounts;

use crate::cgroup;
use crate::spec::{Outcome, PidStamp, Spec, DAEMON_LOG_FILE};
use crate::wipe;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Bound on waiting for a SIGKILLed process to be gone.
pub const KILL_WAIT: Duration = Duration::from_secs(10);
/// Bound on emptying the cgroup (cgroup::kill_all).
pub const CGROUP_KILL_WAIT: Duration = Duration::from_secs(10);
/// Bound on rmdir of the cgroup dirs (EBUSY right after the last exit).
pub const CGROUP_RMDIR_WAIT: Duration = Duration::from_secs(5);
/// Bytes of daemon.log kept in `Outcome.stderr_tail`.
pub const TAIL_BYTES: u64 = 4096;

/// Reaps every exited child without blocking (the shim is a subreaper, so
/// orphans of the daemon's tree may land here). Returns the status of
/// `daemon` if it was among them.
pub fn reap(daemon: Option<Pid>) -> Option<WaitStatus> {
    let mut found = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return found,
            Ok(st @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))) => {
                if Some(pid) == daemon {
                    found = Some(st);
                }
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return found,
        }
    }
}

/// Waits up to `timeout` for our child `pid` to exit, reaping others too;
/// `wait` spends the time between checks.
fn wait_child(pid: Pid, timeout: Duration, wait: &mut dyn FnMut(Duration)) -> Option<WaitStatus> {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(1);
    loop {
        if let Some(st) = reap(Some(pid)) {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        wait(nap.min(deadline.saturating_duration_since(Instant::now())));
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

/// Records how the daemon ended in the outcome.
pub fn record_status(st: &WaitStatus, out: &mut Outcome) {
    match *st {
        WaitStatus::Exited(_, code) => out.exit_code = Some(code),
        WaitStatus::Signaled(_, sig, _) => out.signal = Some(sig as i32),
        _ => {}
    }
}

/// Steps 1 and 2 for our own child: SIGTERM, up to `grace` to exit, then
/// SIGKILL, which, the daemon being pid 1 of its pid namespace, takes the
/// whole namespace with it. `status` is the daemon's exit if already seen.
/// `nap` waits up to the given time between checks (and keeps the daemon's
/// output pipe drained meanwhile, so that its shutdown never blocks on it).
pub fn stop_child(
    id: &str,
    pid: Pid,
    grace: Duration,
    status: Option<WaitStatus>,
    nap: &mut dyn FnMut(Duration),
    out: &mut Outcome,
) {
    let mut status = status.or_else(|| reap(Some(pid)));
    if status.is_none() {
        // A pid-namespace init only gets signals it has a handler for: a
        // daemon without a SIGTERM handler just waits out the grace.
        let _ = kill(pid, Signal::SIGTERM);
        status = wait_child(pid, grace, nap);
        if status.is_none() {
            crate::log!(id, "daemon pid {pid} still running {grace:?} after SIGTERM: SIGKILL");
            let _ = kill(pid, Signal::SIGKILL);
            status = wait_child(pid, KILL_WAIT, nap);
        }
    }
    match status {
        Some(st) => record_status(&st, out),
        None => out.leftovers.push(format!("daemon pid {pid}: not reaped {KILL_WAIT:?} after SIGKILL")),
    }
    reap(None);
}

/// Process state letter from `<proc>/<pid>/stat` ('Z' for a zombie).
fn state(proc_root: &Path, pid: i32) -> Option<char> {
    let stat = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// True while the stamped process runs (a zombie is already dead: it only
/// waits for a parent we do not control to reap it).
pub fn running(stamp: &PidStamp, proc_root: &Path) -> bool {
    stamp.alive(proc_root) && state(proc_root, stamp.pid) != Some('Z')
}

/// SIGKILLs a process known only by its stamp (not our child) and waits
/// for it to be gone. Never signals a recycled pid. Returns whether it was
/// running.
pub fn kill_stamp(what: &str, stamp: &PidStamp, proc_root: &Path, out: &mut Outcome) -> bool {
    if !running(stamp, proc_root) {
        return false;
    }
    match kill(Pid::from_raw(stamp.pid), Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(errno) => {
            out.leftovers.push(format!("{what} pid {}: kill: {errno}", stamp.pid));
            return true;
        }
    }
    let deadline = Instant::now() + KILL_WAIT;
    while running(stamp, proc_root) {
        if Instant::now() >= deadline {
            out.leftovers.push(format!("{what} pid {}: still running {KILL_WAIT:?} after SIGKILL", stamp.pid));
            break;
        }
        reap(None);
        sleep(Duration::from_millis(5));
    }
    true
}

/// The last [`TAIL_BYTES`] of daemon.log, as [`tail_text`] makes them.
pub fn log_tail(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.take(TAIL_BYTES).read_to_end(&mut buf)?;
    Ok(tail_text(&buf, start > 0))
}

/// The last bytes of an output as the outcome shows them: lossy UTF-8,
/// starting at a line boundary when `cut` (something preceded `buf`) and
/// the cut fell inside a line that has a successor.
pub fn tail_text(buf: &[u8], cut: bool) -> String {
    let mut from = 0;
    if cut {
        if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            if nl + 1 < buf.len() {
                from = nl + 1;
            }
        }
    }
    String::from_utf8_lossy(&buf[from..]).trim_end().to_string()
}

/// Steps 3 to 5, once no daemon runs: empty the cgroup and read its usage,
/// remove it; unmount and wipe the instance dir (keeping the log's tail, or
/// `tail` when given: the shim's own copy of the output's end once daemon.log
/// was capped); remove the lease. Without a spec only the dir can be cleaned.
pub fn finish(
    id: &str,
    spec: Option<&Spec>,
    dir: &Path,
    proc_root: &Path,
    tail: Option<String>,
    out: &mut Outcome,
) -> Option<PathBuf> {
    if let Some(spec) = spec {
        reap(None);
        if let Err(e) = cgroup::kill_all(&spec.cgroup, CGROUP_KILL_WAIT) {
            out.leftovers.push(e.to_string());
        }
        reap(None);
        let usage = cgroup::usage(&spec.cgroup);
        out.peak_memory = usage.peak_memory;
        out.oom_kills = usage.oom_kills;
        out.pids_limit_hits = usage.pids_limit_hits;
        if let Err(e) = cgroup::remove(&spec.cgroup, CGROUP_RMDIR_WAIT) {
            out.leftovers.push(e.to_string());
        }
        // Nothing of the instance runs: its veth and subnet go.
        if let Some(net) = &spec.network {
            out.leftovers.extend(crate::net::release(net));
        }
    }
    // Disk hook: the final usage of the instance's filesystem, read while
    // it is still mounted (statfs, no walk); the unmount below releases it.
    if let Some(disk) = spec.and_then(|s| s.disk.as_ref()) {
        out.disk = crate::disk::usage(&disk.mount);
    }
    out.leftovers.extend(mounts::unmount_below(proc_root, dir));
    match tail.map_or_else(|| log_tail(&dir.join(DAEMON_LOG_FILE)), Ok) {
        Ok(tail) => out.stderr_tail = tail,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => crate::log!(id, "{}: {e}", dir.join(DAEMON_LOG_FILE).display()),
    }
    // The wipe's critical path is one rename: the instance's dir leaves its
    // path (and every path an instance or client could name) at once, into
    // a root-only trash entry beside it. Removing the bytes, which takes
    // about as long as `rm -rf` (a second for 1 GiB in 10 000 files), is
    // left to the caller, after the outcome is out.
    let doomed = match trash(dir) {
        Ok(t) => t,
        Err(e) => {
            crate::log!(id, "cannot move {} to the trash ({e}); removing in place", dir.display());
            if let Err(e) = wipe::remove_tree(dir) {
                out.leftovers.extend(e.lines());
            }
            None
        }
    };
    // The id range is released last: nothing of this instance runs any
    // more, and no live instance can reach what is left in the trash.
    if let Some(spec) = spec {
        match fs::remove_file(&spec.lease) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => out.leftovers.push(format!("{}: {e}", spec.lease.display())),
        }
    }
    doomed
}

/// Prefix of trash entries in the instances dir; the agent's sweep removes
/// any it finds (a shim killed while removing one).
pub const TRASH_PREFIX: &str = ".trash-";

/// Renames `dir` to `<parent>/.trash-<name>` (same dir, same filesystem:
/// atomic) and makes it root-only. None when `dir` is already gone.
fn trash(dir: &Path) -> io::Result<Option<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no parent dir"));
    };
    let to = parent.join(format!("{TRASH_PREFIX}{}", name.to_string_lossy()));
    match fs::rename(dir, &to) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let _ = fs::set_permissions(&to, fs::Permissions::from_mode(0o700));
    Ok(Some(to))
}

/// Removes what [`finish`] moved to the trash; what cannot be removed is
/// returned as lines naming each path.
pub fn empty_trash(doomed: Option<PathBuf>) -> Vec<String> {
    match doomed {
        Some(t) => {
            let mut left = wipe::remove_tree(&t).err().map(|e| e.lines()).unwrap_or_default();
            // Disk hook: a loop device still bound to the image (now in the
            // trash) is waited for, then unbound.
            if let Some(name) = t.file_name() {
                left.extend(crate::disk::settle(&format!("{}/{}", name.to_string_lossy(), crate::disk::IMAGE_FILE)));
            }
            left
        }
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_whole_lines_of_the_last_bytes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("log");
        fs::write(&p, "short\nlines\n").unwrap();
        assert_eq!(log_tail(&p).unwrap(), "short\nlines");
        let mut big = String::new();
        for i in 0..1000 {
            big.push_str(&format!("line {i}\n"));
        }
        fs::write(&p, &big).unwrap();
        let tail = log_tail(&p).unwrap();
        assert!(tail.len() <= TAIL_BYTES as usize);
        assert!(tail.starts_with("line ") && tail.ends_with("line 999"), "{tail:.40}");
        // One long line without breaks is cut, not dropped.
        fs::write(&p, vec![b'x'; 10_000]).unwrap();
        assert_eq!(log_tail(&p).unwrap().len(), TAIL_BYTES as usize);
        fs::write(&p, b"bad \xff utf8").unwrap();
        assert_eq!(log_tail(&p).unwrap(), "bad \u{fffd} utf8");
    }

    #[test]
    fn zombie_counts_as_gone_and_recycled_stamp_is_never_killed() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        while state(Path::new("/proc"), pid) != Some('Z') && Instant::now() < deadline {
            sleep(Duration::from_millis(5));
        }
        let zombie = PidStamp::of(Path::new("/proc"), pid).unwrap();
        assert!(zombie.alive(Path::new("/proc")) && !running(&zombie, Path::new("/proc")));
        child.wait().unwrap();

        let me = PidStamp::of(Path::new("/proc"), std::process::id() as i32).unwrap();
        assert!(running(&me, Path::new("/proc")));
        let recycled = PidStamp { pid: me.pid, starttime: me.starttime + 1 };
        let mut out = Outcome::new("t", crate::spec::EndReason::Deleted);
        // Would SIGKILL the test process if the stamp were not checked.
        assert!(!kill_stamp("test", &recycled, Path::new("/proc"), &mut out));
        assert!(out.leftovers.is_empty());
    }
}
