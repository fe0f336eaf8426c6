//! The shim's raw syscalls: every `unsafe` block of the crate is here, each
//! with the reason it is sound. Everything else goes through `nix`, which
//! wraps the calls safely; this module covers what nix lacks or marks unsafe
//! (clone and clone3, sigaction, close_range, closing a raw fd in a cloned child, the
//! loop device ioctls, pidfd_open/pidfd_getfd, SIOCGSKNS, owning a descriptor
//! received with SCM_RIGHTS and placing one at a fixed number in a child).
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

/// `CLONE_INTO_CGROUP` (linux/sched.h, Linux 5.7). libc's constant is an
/// overflowing `c_int` (deprecated), so it is spelled out here.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Like [`clone_child`], but with clone3(2) and `CLONE_INTO_CGROUP`: the
/// child is born in the cgroup v2 dir open as `cgroup` (an `O_PATH`
/// directory fd), so it never has to be moved there. A move (a write to
/// `cgroup.procs`) takes `cgroup_threadgroup_rwsem` for writing, which
/// waits for an RCU grace period (~5 ms on an idle host); a fork into the
/// cgroup takes it for reading only.
///
/// Fork-like: no `CLONE_VM` and no stack of its own, so the child returns
/// from the syscall on its copy of the parent's stack, runs `cb` and exits
/// with its value (also when `cb` panics: the unwind must never run on into
/// the parent's code). Kernels before 5.7 refuse with ENOSYS (no clone3,
/// before 5.3), E2BIG or EINVAL; so do seccomp profiles that hide clone3
/// (ENOSYS). The caller falls back to [`clone_child`] and a move.
pub fn clone_into_cgroup(
    flags: CloneFlags,
    cgroup: BorrowedFd<'_>,
    cb: &mut dyn FnMut() -> isize,
) -> Result<Pid, Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: `clone_args` is plain old data (eleven u64 fields); all-zero
    // is its documented "nothing set" value.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = flags.bits() as u32 as u64 | CLONE_INTO_CGROUP;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = cgroup.as_raw_fd() as u64;
    // SAFETY: the kernel only reads `args` (live, sized, no pointers set).
    // Without CLONE_VM and with stack 0 the child runs on its private copy
    // of our address space and stack, like fork, so its return from this
    // call is sound; locks held by other threads cannot be copied held:
    // callers check `thread_count() == 1` first.
    let rc = unsafe {
        libc::syscall(libc::SYS_clone3, &mut args as *mut libc::clone_args, std::mem::size_of::<libc::clone_args>())
    };
    match rc {
        0 => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(cb)).unwrap_or(126);
            exit_now(code as i32)
        }
        pid if pid > 0 => Ok(Pid::from_raw(pid as i32)),
        _ => Err(Errno::last()),
    }
}

/// Test hook: from now on syscall `nr` fails with `errno` in the calling
/// thread and in every process it starts (a seccomp filter, inherited
/// across fork and exec), as under a container runtime's seccomp profile
/// (clone3 refused with ENOSYS, pidfd_getfd with EPERM). Tests drive the
/// shim's fallback to clone + move and the agent's failed connection
/// counts with it for real (`refuse-syscall` in the tests crate wraps a
/// command in it). Needs CAP_SYS_ADMIN (no no_new_privs is set, so a root
/// process started below stays root). Calls of another architecture (an
/// x32 or 32-bit ABI) are allowed: the number means something else there.
#[doc(hidden)]
pub fn refuse_syscall_in_this_thread(nr: libc::c_long, errno: i32) -> Result<(), Errno> {
    // Classic BPF opcodes (linux/bpf_common.h; libc has them for BSDs
    // only): BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K;
    // and the audit arch of this build (linux/audit.h).
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let filter = [
        // seccomp_data.arch (offset 4): another ABI, allow.
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 0, 3, ARCH),
        // seccomp_data.nr (offset 0)
        op(LD_W_ABS, 0, 0, 0),
        op(JEQ_K, 0, 1, nr as u32),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA)),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut libc::sock_filter };
    // SAFETY: `prog` points at `filter`, both live for the whole call; the
    // kernel copies the program and keeps no pointer to it. PR_SET_SECCOMP
    // (unlike seccomp(2) with TSYNC) applies to the calling thread only.
    if unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
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

/// Takes ownership of a descriptor this process inherited at exec (the
/// pod's listener the agent passes as fd 3), marks it close-on-exec and
/// checks that it is a listening socket. Fails with EBADF when `fd` is not
/// open. Call it early, before anything else could own that number.
/// (fakekitd uses it too, for `--addr fd://`.)
pub fn inherited_listener(fd: RawFd) -> Result<OwnedFd, Errno> {
    // SAFETY: F_GETFD takes no pointer; on a closed number it fails with
    // EBADF and touches nothing.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `fd` is open (checked above) and was inherited across exec, so
    // no OwnedFd or File of this process owns it yet: callers take it once,
    // at start, before any other code could have wrapped the number.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    if !nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::AcceptConn)? {
        return Err(Errno::EINVAL);
    }
    Ok(owned)
}

/// Receives one byte and at most one descriptor (SCM_RIGHTS) from a unix
/// stream socket: a warm sandbox's go, from the agent to the shim and from
/// the shim to its held child. `(0, None)` at EOF. The descriptor arrives
/// close-on-exec; extra ones are closed.
pub fn recv_byte_and_fd(sock: BorrowedFd<'_>) -> Result<(usize, u8, Option<OwnedFd>), Errno> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let n = msg.bytes;
    let mut got = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel installed `fd` in this process's table
                // for this message just now; nothing else knows the number,
                // so this OwnedFd is its only owner.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(owned);
                }
            }
        }
    }
    drop(iov);
    Ok((n, byte[0], got))
}

/// In a cloned child: makes `fd` the child's descriptor number `at`
/// (dup2), without close-on-exec, and closes the original number. Whatever
/// the child had at `at` is closed by dup2; the caller checks that it is
/// none of the descriptors the child still needs.
pub fn place_in_child(fd: OwnedFd, at: RawFd) -> Result<(), Errno> {
    use std::os::fd::IntoRawFd;
    let raw = fd.into_raw_fd();
    if raw == at {
        // SAFETY: F_SETFD takes no pointer; `at` is open (it is `fd`).
        return Errno::result(unsafe { libc::fcntl(at, libc::F_SETFD, 0) }).map(drop);
    }
    // SAFETY: dup2 takes no pointers. The child's fd table is its own copy
    // (clone without CLONE_FILES): closing its copy of `at` cannot affect
    // the parent, and any OwnedFd for `at` lives in memory the child never
    // drops (it only execs or _exits). dup2's copy has no FD_CLOEXEC.
    let rc = unsafe { libc::dup2(raw, at) };
    let res = Errno::result(rc).map(drop);
    close_in_child(raw);
    res
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

/// A pidfd for host pid `pid` (pidfd_open(2), Linux 5.3): it stays bound to
/// that process even if the number is reused. nix has no wrapper.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes the pid and flags by value, touches no memory
    // of ours, and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A duplicate, in this process, of descriptor `fd` of the process behind
/// `pidfd` (pidfd_getfd(2), Linux 5.6; close-on-exec). Needs ptrace access
/// to that process (CAP_SYS_PTRACE for the agent). nix has no wrapper.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: RawFd) -> Result<OwnedFd, Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: all three arguments are plain integers; the call touches no
    // memory of ours and returns a new descriptor or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0 as libc::c_uint) };
    if got < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(got as RawFd) })
}

/// `SIOCGSKNS` (linux/sockios.h, Linux 4.9): the network namespace of a socket.
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// Opens the network namespace a socket belongs to (SIOCGSKNS). For an
/// accepted unix socket that is the namespace of the process that
/// connected, not of the one that accepted. Needs CAP_NET_ADMIN over that
/// namespace. nix has no wrapper.
pub fn socket_netns(sock: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: `sock` is a valid open descriptor for the duration of the
    // call; SIOCGSKNS takes no argument and returns a new descriptor.
    let fd = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGSKNS as _, 0) };
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

/// Loop devices through their ioctls (see the module).
pub mod loopdev;
