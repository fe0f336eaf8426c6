//! The shim's raw syscalls: every `unsafe` block of the crate is here, each
//! with the reason it is sound. Everything else goes through `nix`, which
//! wraps the calls safely; this module covers what nix lacks or marks unsafe
//! (clone, sigaction, close_range, closing a raw fd in a cloned child).
//!
//! All of these assume the process is single-threaded when they matter
//! (clone): the shim checks that with [`thread_count`] before cloning.

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sched::CloneFlags;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;
use std::fs;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Stack of a cloned child. It runs a short straight-line setup and then
/// execs (or `_exit`s), so 1 MiB is far more than it needs; the memory is
/// the parent's heap, copied on write into the child, and freed after clone.
pub const CHILD_STACK: usize = 1 << 20;

/// Threads of the calling process, from `<proc>/self/task`.
///
/// clone without CLONE_VM copies only the calling thread: if another thread
/// held a lock (malloc's, stdio's), the child would deadlock on it. The shim
/// is single-threaded by construction; this turns that into a checked fact.
pub fn thread_count(proc_root: &Path) -> std::io::Result<usize> {
    Ok(fs::read_dir(proc_root.join("self/task"))?.count())
}

/// Clones a child into the namespaces in `flags`. The child runs `cb` on
/// `stack` and exits with its return value (glibc's clone wrapper calls the
/// exit syscall directly, running no atexit handlers); the parent gets the
/// child's host pid. The child is reported with SIGCHLD like a forked one.
pub fn clone_child(flags: CloneFlags, stack: &mut [u8], cb: &mut dyn FnMut() -> isize) -> Result<Pid, Errno> {
    // SAFETY: without CLONE_VM the child gets a private copy of the address
    // space, like fork, and `stack` is a live heap buffer of CHILD_STACK
    // bytes, far more than the child's setup uses. The remaining hazard of
    // fork-like calls, locks held by other threads, does not apply: callers
    // check `thread_count() == 1` first (the shim never starts threads).
    unsafe { nix::sched::clone(Box::new(cb), stack, flags, Some(libc::SIGCHLD)) }
}

/// Ends a cloned child at once: no atexit handlers, no stdio flushing of
/// buffers that are copies of the parent's (which would print twice).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it only ends the process.
    unsafe { libc::_exit(code) }
}

/// Closes, in a cloned child, a descriptor the parent keeps: the handshake
/// pipe's write end must be shut in the child or it never sees EOF.
pub fn close_in_child(fd: RawFd) {
    // SAFETY: after clone the child's fd table is its own copy. The parent's
    // OwnedFd for this number lives in memory the child copied but never
    // drops (the child only execs or _exits), so closing the child's copy
    // here cannot double-close or invalidate anything in either process.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
}

/// Marks every descriptor from `first` up close-on-exec, so nothing the
/// shim holds (the agent's lifeline pipe, the handshake pipe) reaches the
/// daemon. Uses close_range(CLOSE_RANGE_CLOEXEC) (Linux 5.11) and falls
/// back to walking `/proc/self/fd` on older kernels.
pub fn cloexec_from(first: RawFd) -> Result<(), Errno> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing; it only
    // sets FD_CLOEXEC on open descriptors in the range. It takes no
    // pointers, so no memory is at stake.
    let rc = unsafe {
        libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC)
    };
    if rc == 0 {
        return Ok(());
    }
    let rd = fs::read_dir("/proc/self/fd").map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    for e in rd.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
            continue;
        };
        if fd < first {
            continue;
        }
        // SAFETY: `fd` was listed as open in /proc/self/fd just now and this
        // process is single-threaded, so nothing can close it before fcntl;
        // the borrow lives only for this one call. (The fd of the listing
        // itself may be among them; marking it CLOEXEC is harmless.)
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = fcntl(bfd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
    Ok(())
}

/// Resets every catchable signal to its default action and unblocks all.
///
/// Dispositions set to "ignore" survive execve: the Rust runtime ignores
/// SIGPIPE in the shim, and the agent may ignore others, and the daemon
/// must not inherit that (nor the shim's blocked mask, which also survives).
pub fn reset_signals() {
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if sig == Signal::SIGKILL || sig == Signal::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL registers no handler code, so there is
        // no signal-safety requirement on anything; the old action returned
        // is discarded.
        let _ = unsafe { sigaction(sig, &dfl) };
    }
    let _ = nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Sets IFF_UP on `lo` of the calling process's network namespace, as
/// `ip link set lo up` does: SIOCGIFFLAGS, then SIOCSIFFLAGS. nix has no
/// safe wrapper for these ioctls.
pub fn loopback_up() -> Result<(), Errno> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    // SAFETY: `ifreq` is plain old data (a name array and a union of plain
    // fields), for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `sock` is an open socket we own, and `req` is a valid, writable
    // ifreq that outlives the call; SIOCGIFFLAGS writes only `ifru_flags`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just filled `ifru_flags`, the union's active field.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Which namespace of a process [`pidfd_namespace`] opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidfdNs {
    Pid,
    Mnt,
}

/// Opens a namespace of the process behind `pidfd` (PIDFD_GET_PID_NAMESPACE
/// and friends, Linux 6.11+). Unlike /proc/<pid>/ns this works for a process
/// whose pid is not visible in the caller's pid namespace. nix has no wrapper.
pub fn pidfd_namespace(pidfd: BorrowedFd<'_>, ns: PidfdNs) -> Result<OwnedFd, Errno> {
    use std::os::fd::AsRawFd;
    let request = match ns {
        PidfdNs::Pid => libc::PIDFD_GET_PID_NAMESPACE,
        PidfdNs::Mnt => libc::PIDFD_GET_MNT_NAMESPACE,
    };
    // SAFETY: `pidfd` is a valid open descriptor for the duration of the
    // call; these ioctls take no argument and return a new descriptor.
    let fd = unsafe { libc::ioctl(pidfd.as_raw_fd(), request as _, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The 64-bit id of a mount namespace (NS_GET_MNTNS_ID, Linux 6.8+): unlike
/// the nsfs inode number, it is never reused while the machine runs.
pub fn mntns_id(mntns: BorrowedFd<'_>) -> Result<u64, Errno> {
    use std::os::fd::AsRawFd;
    let mut id: u64 = 0;
    // SAFETY: `mntns` is a valid open descriptor; the ioctl writes one u64
    // to the pointer, which points at a live, writable u64.
    if unsafe { libc::ioctl(mntns.as_raw_fd(), libc::NS_GET_MNTNS_ID as _, &mut id as *mut u64) } < 0 {
        return Err(Errno::last());
    }
    Ok(id)
}

/// The calling process as seen from pid namespace `pidns`
/// (NS_GET_TGID_IN_PIDNS, Linux 6.10+): `Some(pid)` when `pidns` is the
/// caller's own or an ancestor of it, `None` when the caller is not visible
/// there (a sibling namespace, such as another pod's).
pub fn self_in_pidns(pidns: BorrowedFd<'_>) -> Result<Option<i32>, Errno> {
    use std::os::fd::AsRawFd;
    let me = std::process::id() as libc::c_int;
    // SAFETY: `pidns` is a valid open descriptor; this ioctl takes the pid by
    // value and returns the translated pid, touching no memory of ours.
    let rc = unsafe { libc::ioctl(pidns.as_raw_fd(), libc::NS_GET_TGID_IN_PIDNS as _, me) };
    match rc {
        n if n > 0 => Ok(Some(n)),
        0 => Ok(None),
        _ => match Errno::last() {
            Errno::ESRCH => Ok(None),
            e => Err(e),
        },
    }
}
