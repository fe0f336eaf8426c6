//! `berth-shim probe-userns`: tries for real what `run` needs from the
//! kernel, so that `berth-agent check` reports a missing feature before a
//! build does: clone into new user, mount and pid namespaces, map ids from
//! a privileged parent, become root inside, and mount a fresh /proc; and,
//! given a dir, mount overlayfs there from inside the user namespace, as
//! buildkit's overlay snapshotter will (kernel >= 5.11, and not on top of
//! another overlayfs).
//!
//! The mapping is a single id, `0 2147483648 1`: high above any real user
//! or instance range, and one id is enough for the steps tried.

use crate::sys;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{pipe2, read, setgroups, setresgid, setresuid, write, Gid, Pid, Uid};
use std::fs;
use std::io::Write as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

/// The probe's id map line for both uid_map and gid_map.
pub const PROBE_MAP: &str = "0 2147483648 1\n";
pub const PROBE_HOST_ID: u32 = 2147483648;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{what}: {errno}")]
    Sys { what: &'static str, errno: Errno },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{proc}: {threads} threads, clone needs exactly one")]
    Threads { proc: PathBuf, threads: usize },
    #[error("in the new namespaces: {0}")]
    Child(String),
    #[error("probe child pid {pid} ended with {status:?} without a report")]
    Status { pid: Pid, status: WaitStatus },
}

fn sys_at(what: &'static str) -> impl FnOnce(Errno) -> ProbeError {
    move |errno| ProbeError::Sys { what, errno }
}

/// Runs the probe; Ok means user namespaces work as `run` uses them.
pub fn probe(proc_root: &Path, overlay: Option<&Path>) -> Result<(), ProbeError> {
    if let Some(dir) = overlay {
        prepare_overlay(dir)?;
    }
    let res = probe_ns(proc_root, overlay);
    if let Some(dir) = overlay {
        let _ = fs::remove_dir_all(dir);
    }
    res
}

/// lower/upper/work/merged under `dir`, owned by the probe's mapped root.
fn prepare_overlay(dir: &Path) -> Result<(), ProbeError> {
    let owner = Some(Uid::from_raw(PROBE_HOST_ID));
    for sub in ["", "lower", "upper", "work", "merged"] {
        let path = dir.join(sub);
        fs::create_dir_all(&path).map_err(|source| ProbeError::Io { path: path.clone(), source })?;
        nix::unistd::chown(&path, owner, Some(Gid::from_raw(PROBE_HOST_ID))).map_err(sys_at("chown overlay dir"))?;
    }
    Ok(())
}

fn probe_ns(proc_root: &Path, overlay: Option<&Path>) -> Result<(), ProbeError> {
    let (sync_r, sync_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys_at("pipe2"))?;
    let (rep_r, rep_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys_at("pipe2"))?;
    let task = proc_root.join("self/task");
    let threads = sys::thread_count(proc_root).map_err(|source| ProbeError::Io { path: task.clone(), source })?;
    if threads != 1 {
        return Err(ProbeError::Threads { proc: task, threads });
    }
    let flags = CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID;
    let pid = {
        let (r, w, close) = (sync_r.as_fd(), rep_w.as_fd(), [sync_w.as_raw_fd(), rep_r.as_raw_fd()]);
        let mut stack = vec![0u8; sys::CHILD_STACK];
        sys::clone_child(flags, &mut stack, &mut || child(r, w, close, overlay)).map_err(sys_at("clone"))?
    };
    drop((sync_r, rep_w));
    let parent_steps = || -> Result<(), ProbeError> {
        for file in ["uid_map", "gid_map"] {
            let path = proc_root.join(pid.to_string()).join(file);
            fs::write(&path, PROBE_MAP).map_err(|source| ProbeError::Io { path, source })?;
        }
        write(&sync_w, &[1]).map_err(sys_at("handshake write"))?;
        Ok(())
    };
    let res = parent_steps();
    if res.is_err() {
        let _ = kill(pid, Signal::SIGKILL);
    }
    drop(sync_w);
    let status = loop {
        match waitpid(pid, None) {
            Err(Errno::EINTR) => continue,
            r => break r.map_err(sys_at("waitpid"))?,
        }
    };
    res?;
    let mut report = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n @ 1..) = read(&rep_r, &mut buf) {
        report.extend_from_slice(&buf[..n]);
    }
    match status {
        WaitStatus::Exited(_, 0) => Ok(()),
        _ if !report.is_empty() => Err(ProbeError::Child(String::from_utf8_lossy(&report).trim().to_string())),
        status => Err(ProbeError::Status { pid, status }),
    }
}

/// The probe child: the same steps as the daemon's child, minus exec.
fn child(sync_r: BorrowedFd, rep_w: BorrowedFd, close: [RawFd; 2], overlay: Option<&Path>) -> isize {
    for fd in close {
        sys::close_in_child(fd);
    }
    let mut b = [0u8; 1];
    if !matches!(read(sync_r, &mut b), Ok(1)) {
        sys::exit_now(1);
    }
    let steps = || -> Result<(), (&'static str, Errno)> {
        setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)).map_err(|e| ("setresgid", e))?;
        setgroups(&[]).map_err(|e| ("setgroups", e))?;
        setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).map_err(|e| ("setresuid", e))?;
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
            .map_err(|e| ("mount --make-rprivate /", e))?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(Some("proc"), "/proc", Some("proc"), flags, None::<&str>).map_err(|e| ("mount proc on /proc", e))?;
        if let Some(dir) = overlay {
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                dir.join("lower").display(),
                dir.join("upper").display(),
                dir.join("work").display()
            );
            mount(Some("overlay"), &dir.join("merged"), Some("overlay"), MsFlags::empty(), Some(opts.as_str()))
                .map_err(|e| ("mount overlayfs in the user namespace", e))?;
            fs::write(dir.join("merged/probe"), b"ok")
                .map_err(|e| ("write into overlayfs", Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        }
        Ok(())
    };
    if let Err((step, errno)) = steps() {
        let mut buf = [0u8; 256];
        let mut cur = std::io::Cursor::new(&mut buf[..]);
        let _ = write!(cur, "{step}: {errno:?}: {}", errno.desc());
        let n = cur.position() as usize;
        let _ = write(rep_w, &buf[..n]);
        sys::exit_now(1);
    }
    sys::exit_now(0)
}
