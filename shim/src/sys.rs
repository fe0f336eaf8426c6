//! The shim's raw syscalls: every `unsafe` block of the crate is here, each
//! with the reason it is sound. Everything else goes through `nix`, which
//! wraps the calls safely; this module covers what nix lacks or marks unsafe
//! (clone, sigaction, close_range, closing a raw fd in a cloned child, the
//! loop device ioctls, pidfd_open/pidfd_getfd and SIOCGSKNS).
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

/// Loop devices through their ioctls (`linux/loop.h`): take a free device
/// from `/dev/loop-control`, bind an image file to it with autoclear, and
/// unbind it. Hand-written because nix has no loop wrappers and the loopdev
/// crates generate their bindings with bindgen (libclang at build time) for
/// the four requests and two plain structs needed here.
///
/// Autoclear is what makes a crash harmless: the kernel unbinds the device
/// when its last user goes, which is the mount once the image is mounted,
/// and the binding fd before that. So no code path has to remember to
/// detach it, and `/sys/block/loopN/loop/backing_file` tells a sweep which
/// image a still-bound device belongs to.
pub mod loopdev {
    use nix::errno::Errno;
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::path::{Path, PathBuf};

    const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
    const LOOP_SET_FD: libc::c_ulong = 0x4C00;
    const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
    const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
    const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
    /// `LO_FLAGS_AUTOCLEAR`: unbind when the last opener closes.
    const LO_FLAGS_AUTOCLEAR: u32 = 4;
    const LO_NAME_SIZE: usize = 64;

    /// `struct loop_info64`.
    #[repr(C)]
    struct LoopInfo64 {
        lo_device: u64,
        lo_inode: u64,
        lo_rdevice: u64,
        lo_offset: u64,
        lo_sizelimit: u64,
        lo_number: u32,
        lo_encrypt_type: u32,
        lo_encrypt_key_size: u32,
        lo_flags: u32,
        lo_file_name: [u8; LO_NAME_SIZE],
        lo_crypt_name: [u8; LO_NAME_SIZE],
        lo_encrypt_key: [u8; 32],
        lo_init: [u64; 2],
    }

    /// `struct loop_config` (Linux 5.8).
    #[repr(C)]
    struct LoopConfig {
        fd: u32,
        block_size: u32,
        info: LoopInfo64,
        reserved: [u64; 8],
    }

    fn info_for(image: &Path) -> LoopInfo64 {
        use std::os::unix::ffi::OsStrExt;
        let mut name = [0u8; LO_NAME_SIZE];
        let raw = image.as_os_str().as_bytes();
        let n = raw.len().min(LO_NAME_SIZE - 1);
        name[..n].copy_from_slice(&raw[..n]);
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR,
            lo_file_name: name,
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }

    /// Binds `image` (open read-write as `file`) to a free loop device with
    /// autoclear. Returns the device path and an open fd of it: the device
    /// stays bound while that fd (or, later, a mount of it) lives.
    pub fn attach(image: &Path, file: &OwnedFd) -> Result<(PathBuf, OwnedFd), Errno> {
        let ctl = open("/dev/loop-control", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())?;
        // Another process may take the device between GET_FREE and the bind
        // (EBUSY): ask again, a bounded number of times.
        let mut last = Errno::EBUSY;
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device
            // number; `ctl` is an open fd of /dev/loop-control we own.
            let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
            if n < 0 {
                return Err(Errno::last());
            }
            let dev = PathBuf::from(format!("/dev/loop{n}"));
            let loopfd = match open(&dev, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty()) {
                Ok(fd) => fd,
                // The node may appear a moment after the device (udev-less hosts
                // create it in devtmpfs at once; containers may lack it).
                Err(e) => return Err(e),
            };
            let config =
                LoopConfig { fd: file.as_raw_fd() as u32, block_size: 0, info: info_for(image), reserved: [0; 8] };
            // SAFETY: `config` is a fully initialised `struct loop_config` that
            // outlives the call, which only reads it; both fds are open and ours.
            let rc = unsafe { libc::ioctl(loopfd.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
            if rc == 0 {
                return Ok((dev, loopfd));
            }
            match Errno::last() {
                Errno::EBUSY => {
                    last = Errno::EBUSY;
                    continue;
                }
                // Kernels before 5.8: bind, then set the flags.
                Errno::EINVAL | Errno::ENOTTY => {}
                e => return Err(e),
            }
            // SAFETY: LOOP_SET_FD takes the backing file's fd as its integer
            // argument; no memory is passed.
            if unsafe { libc::ioctl(loopfd.as_raw_fd(), LOOP_SET_FD as _, file.as_raw_fd() as libc::c_ulong) } < 0 {
                match Errno::last() {
                    Errno::EBUSY => {
                        last = Errno::EBUSY;
                        continue;
                    }
                    e => return Err(e),
                }
            }
            let info = info_for(image);
            // SAFETY: `info` is a fully initialised `struct loop_info64` that
            // outlives the call, which only reads it.
            if unsafe { libc::ioctl(loopfd.as_raw_fd(), LOOP_SET_STATUS64 as _, &info) } < 0 {
                let e = Errno::last();
                let _ = clear_fd(&loopfd);
                return Err(e);
            }
            return Ok((dev, loopfd));
        }
        Err(last)
    }

    /// Unbinds the device open as `fd`. On a device still in use (mounted) the
    /// kernel only sets autoclear, so it goes with its last user.
    pub fn clear_fd(fd: &OwnedFd) -> Result<(), Errno> {
        // SAFETY: LOOP_CLR_FD takes no argument.
        if unsafe { libc::ioctl(fd.as_raw_fd(), LOOP_CLR_FD as _) } < 0 {
            return Err(Errno::last());
        }
        Ok(())
    }

    /// Unbinds the device at `dev` (a path such as `/dev/loop3`).
    pub fn clear(dev: &Path) -> Result<(), Errno> {
        let fd = open(dev, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())?;
        clear_fd(&fd)
    }
}
