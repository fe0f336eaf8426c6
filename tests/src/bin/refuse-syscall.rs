//! refuse-syscall: runs a command under a seccomp filter that fails one
//! syscall with one errno, as a container runtime's default profile does
//! (for example pidfd_getfd with EPERM without CAP_SYS_PTRACE). Tests wrap
//! an agent in it to drive a refused call for real.
//!
//! Usage: refuse-syscall <syscall number> <errno> -- <command> [args...]
//! Exit status 2 on a usage error, 1 if the filter cannot be set or the
//! command cannot be run.

use std::os::unix::process::CommandExt;
use std::process::{exit, Command};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (nr, errno, cmd) = match args.as_slice() {
        [nr, errno, dashes, cmd @ ..] if dashes == "--" && !cmd.is_empty() => (nr, errno, cmd),
        _ => usage("expected <syscall number> <errno> -- <command> [args...]"),
    };
    let nr: libc::c_long = nr.parse().unwrap_or_else(|_| usage(&format!("syscall number {nr:?} is not a number")));
    let errno: i32 = errno.parse().unwrap_or_else(|_| usage(&format!("errno {errno:?} is not a number")));
    if let Err(e) = berth_shim::sys::refuse_syscall_in_this_thread(nr, errno) {
        eprintln!("refuse-syscall: prctl(PR_SET_SECCOMP) for syscall {nr}: {e} (needs CAP_SYS_ADMIN)");
        exit(1);
    }
    let e = Command::new(&cmd[0]).args(&cmd[1..]).exec();
    eprintln!("refuse-syscall: {}: {e}", cmd[0]);
    exit(1);
}

fn usage(why: &str) -> ! {
    eprintln!("refuse-syscall: {why}\nusage: refuse-syscall <syscall number> <errno> -- <command> [args...]");
    exit(2);
}
