//! Reference proxies for figure 2, run as `berth-bench __proxy <mode>
//! <listen> <upstream>` in a process of their own (like the agent), to tell
//! what limits berth's throughput: the agent's proxy code, or proxying in
//! user space as such, or copying.
//! - `copy`: the agent's algorithm (tokio `copy_bidirectional_with_sizes`,
//!   256 KiB per direction, 2 worker threads), without admission etc.
//! - `splice`: zero-copy: per direction a thread moving bytes socket ->
//!   pipe -> socket with splice(2), so the payload is never copied to user
//!   space (af_unix supports splice reads and, since 6.5, MSG_SPLICE_PAGES
//!   sends).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

/// `__proxy <copy|splice> <listen> <upstream>`; never returns.
pub fn main(args: &[String]) -> ! {
    let (Some(mode), Some(listen), Some(up)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("usage: berth-bench __proxy <copy|splice> <listen-socket> <upstream-socket>");
        std::process::exit(2);
    };
    let (listen, up) = (PathBuf::from(listen), PathBuf::from(up));
    let code = match mode.as_str() {
        "copy" => copy(listen, up),
        "splice" => splice_proxy(listen, up),
        m => {
            eprintln!("unknown proxy mode {m}");
            2
        }
    };
    std::process::exit(code)
}

const BUF: usize = 256 * 1024;

fn copy(listen: PathBuf, up: PathBuf) -> i32 {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let l = match tokio::net::UnixListener::bind(&listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bind {}: {e}", listen.display());
                return 1;
            }
        };
        loop {
            let Ok((mut c, _)) = l.accept().await else { continue };
            let up = up.clone();
            tokio::spawn(async move {
                if let Ok(mut u) = tokio::net::UnixStream::connect(&up).await {
                    let _ = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, BUF, BUF).await;
                }
            });
        }
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // A bigger pipe moves more per splice call (default 64 KiB); best effort.
    let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    Ok((r, w))
}

/// Moves bytes from `src` to `dst` through a pipe until EOF, then shuts
/// `dst`'s write side.
fn pump(src: &UnixStream, dst: &UnixStream) -> io::Result<()> {
    let (pr, pw) = pipe()?;
    use nix::errno::Errno;
    use nix::fcntl::{splice, SpliceFFlags};
    let flags = SpliceFFlags::SPLICE_F_MOVE;
    loop {
        // Null offsets: sockets and pipes have none.
        let n = match splice(src, None, &pw, None, 1 << 20, flags) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            let _ = dst.shutdown(std::net::Shutdown::Write);
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            match splice(&pr, None, dst, None, left, flags) {
                Ok(m) => left -= m,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn splice_proxy(listen: PathBuf, up: PathBuf) -> i32 {
    let l = match UnixListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind {}: {e}", listen.display());
            return 1;
        }
    };
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let Ok(u) = UnixStream::connect(&up) else { continue };
        let (c2, u2) = match (c.try_clone(), u.try_clone()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => continue,
        };
        std::thread::spawn(move || {
            let _ = pump(&c, &u);
        });
        std::thread::spawn(move || {
            let _ = pump(&u2, &c2);
            let _ = c2.shutdown(std::net::Shutdown::Both);
        });
    }
    0
}
