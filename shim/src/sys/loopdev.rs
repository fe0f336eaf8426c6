//! Loop devices through their ioctls (`linux/loop.h`): take a free device
//! from `/dev/loop-control`, bind an image file to it with autoclear, and
//! unbind it. Hand-written because nix has no loop wrappers and the loopdev
//! crates generate their bindings with bindgen (libclang at build time) for
//! the four requests and two plain structs needed here.
//!
//! Autoclear is what makes a crash harmless: the kernel unbinds the device
//! when its last user goes, which is the mount once the image is mounted,
//! and the binding fd before that. So no code path has to remember to
//! detach it, and `/sys/block/loopN/loop/backing_file` tells a sweep which
//! image a still-bound device belongs to.
//!
//! Part of `sys`: the one place of the crate allowed unsafe code.

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
        let config = LoopConfig { fd: file.as_raw_fd() as u32, block_size: 0, info: info_for(image), reserved: [0; 8] };
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
