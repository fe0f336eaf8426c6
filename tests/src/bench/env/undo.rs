//! The undo registry: everything the bench starts or creates is recorded
//! here and undone on drop, on a panic and on SIGINT/SIGTERM.

use super::*;

/// Something the bench created and must remove, whatever happens.
#[derive(Debug, Clone)]
pub enum Undo {
    /// An agent: SIGKILL it (unless reaped: pid 0), then clean its scope
    /// (processes, mounts, cgroups) and remove its temp dir.
    Agent { pid: Arc<AtomicU32>, scope: LeakScope },
    /// A process started directly (baseline fakekitd): SIGKILL, unless
    /// already killed and reaped (pid 0).
    Pid(Arc<AtomicU32>),
    /// A mount point: unmount (lazily if busy), then rmdir.
    Mount(PathBuf),
    /// A loop device to detach.
    Loop(PathBuf),
    /// A dir to remove recursively.
    Dir(PathBuf),
    /// A cgroup dir: kill its processes, rmdir it.
    Cgroup(PathBuf),
}

pub(crate) static UNDO: Mutex<Vec<(u64, Undo)>> = Mutex::new(Vec::new());
/// Set once a signal arrived: the signal thread undoes everything and exits.
pub(crate) static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// Parks the calling thread for good once a signal arrived, so that it
/// neither creates anything more nor ends the process before the signal
/// thread has undone everything and exited.
pub fn park_if_shutting_down() {
    while SHUTTING_DOWN.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
pub(crate) static UNDO_SEQ: AtomicU64 = AtomicU64::new(1);

/// Registers `u`; the returned guard performs it when dropped, unless
/// [`UndoGuard::forget`] was called. [`run_all`] performs every pending one.
pub fn register(u: Undo) -> UndoGuard {
    if SHUTTING_DOWN.load(Ordering::SeqCst) {
        // Created after the cleanup began: undo it right away, then park.
        perform(&u);
        park_if_shutting_down();
    }
    let id = UNDO_SEQ.fetch_add(1, Ordering::SeqCst);
    UNDO.lock().unwrap_or_else(|e| e.into_inner()).push((id, u));
    UndoGuard(id)
}

#[derive(Debug)]
pub struct UndoGuard(u64);

impl UndoGuard {
    /// Done by hand: nothing to undo any more.
    pub fn forget(self) {
        take(self.0);
        std::mem::forget(self);
    }
}

impl Drop for UndoGuard {
    fn drop(&mut self) {
        if let Some(u) = take(self.0) {
            perform(&u);
        }
    }
}

pub(crate) fn take(id: u64) -> Option<Undo> {
    let mut g = UNDO.lock().unwrap_or_else(|e| e.into_inner());
    let i = g.iter().position(|(k, _)| *k == id)?;
    Some(g.remove(i).1)
}

/// Performs every pending undo, newest first (signal path).
pub fn run_all() {
    loop {
        let next = UNDO.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match next {
            Some((_, u)) => perform(&u),
            None => break,
        }
    }
}

pub(crate) fn perform(u: &Undo) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    match u {
        Undo::Agent { pid, scope } => {
            let pid = pid.swap(0, Ordering::SeqCst);
            if pid != 0 {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
            }
            harness::cleanup(scope);
            let _ = fs::remove_dir_all(&scope.dir);
        }
        Undo::Pid(pid) => {
            let pid = pid.swap(0, Ordering::SeqCst);
            if pid != 0 {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        Undo::Mount(p) => {
            if nix::mount::umount2(p, nix::mount::MntFlags::empty()).is_err() {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
            let _ = fs::remove_dir(p);
        }
        Undo::Loop(dev) => {
            let _ = loop_detach(dev);
        }
        Undo::Dir(d) => {
            // Retried: on the signal path another thread may still be
            // writing into it for a moment.
            for _ in 0..50 {
                if fs::remove_dir_all(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Undo::Cgroup(d) => {
            for _ in 0..100 {
                for pid in fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default().lines() {
                    if let Ok(p) = pid.trim().parse::<i32>() {
                        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                    }
                }
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // The shared parent, when empty.
            if let Some(p) = d.parent() {
                if p.file_name().is_some_and(|n| n == CGROUP_TOP) {
                    let _ = fs::remove_dir(p);
                }
            }
        }
    }
}

/// `LOOP_CLR_FD` on `dev`.
pub fn loop_detach(dev: &Path) -> io::Result<()> {
    const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
    let f = fs::File::open(dev)?;
    // SAFETY: a plain ioctl without arguments on an fd we own.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), LOOP_CLR_FD as _, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts a thread that, on SIGINT/SIGTERM/SIGHUP, undoes everything and
/// exits 130. It runs its own small runtime, so a busy or blocked main
/// thread does not delay it. (Handlers, unlike a blocked signal mask, are
/// not inherited by the processes the bench starts.)
pub fn install_signal_cleanup() {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
        Ok(rt) => rt,
        Err(_) => return,
    };
    // Registered here, before any figure runs, so no signal slips through.
    let sigs = rt.block_on(async {
        Some((
            signal(SignalKind::interrupt()).ok()?,
            signal(SignalKind::terminate()).ok()?,
            signal(SignalKind::hangup()).ok()?,
        ))
    });
    let Some((mut int, mut term, mut hup)) = sigs else { return };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let name = rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                    _ = hup.recv() => "SIGHUP",
                }
            });
            progress!("{name}: cleaning up");
            SHUTTING_DOWN.store(true, Ordering::SeqCst);
            run_all();
            // Anything registered while the first pass ran.
            run_all();
            std::process::exit(130);
        })
        .expect("signal thread");
}
