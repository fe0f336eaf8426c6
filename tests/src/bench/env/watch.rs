//! [`SocketWatch`]: when does a new instance's daemon bind its socket?

use super::*;

/// Watches `<state>/instances` with inotify for the next instance dir and
/// reports when its daemon socket (`run/buildkitd.sock`) is created: the
/// moment the daemon has bound it, the same point at which a directly
/// started fakekitd prints "serving on". Call [`SocketWatch::arm`] before
/// connecting and [`SocketWatch::wait`] after.
pub struct SocketWatch {
    pub(crate) fd: nix::sys::inotify::Inotify,
    pub(crate) instances: PathBuf,
}

impl SocketWatch {
    pub fn arm(instances: &Path) -> io::Result<SocketWatch> {
        use nix::sys::inotify::{InitFlags, Inotify};
        let fd = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
        let w = SocketWatch { fd, instances: instances.to_path_buf() };
        w.add(instances)?;
        Ok(w)
    }

    pub(crate) fn add(&self, p: &Path) -> io::Result<()> {
        self.fd.add_watch(p, nix::sys::inotify::AddWatchFlags::IN_CREATE)?;
        Ok(())
    }

    /// Blocks until the socket of the first instance dir created after
    /// `arm` exists; returns when that was seen.
    pub fn wait(self, timeout: Duration) -> io::Result<Instant> {
        use nix::poll::{poll, PollFd, PollFlags};
        let deadline = Instant::now() + timeout;
        let mut dir: Option<PathBuf> = None;
        let mut run_watched = false;
        loop {
            // Re-check the file system after each (re)arm: events may have
            // happened before a watch existed.
            if let Some(d) = &dir {
                if !run_watched && d.join("run").exists() {
                    run_watched = self.add(&d.join("run")).is_ok();
                }
                if d.join("run").join("buildkitd.sock").exists() {
                    return Ok(Instant::now());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no daemon socket appeared"));
            }
            let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut pfd, left.as_millis().min(1000) as u16);
            // Non-blocking: EAGAIN when poll timed out.
            let Ok(events) = self.fd.read_events() else { continue };
            let at = Instant::now();
            for ev in events {
                let Some(name) = ev.name.map(|n| n.to_string_lossy().into_owned()) else { continue };
                match &dir {
                    None => {
                        let d = self.instances.join(&name);
                        let _ = self.add(&d);
                        dir = Some(d);
                    }
                    Some(d) if name == "run" && !run_watched => {
                        run_watched = self.add(&d.join("run")).is_ok();
                    }
                    Some(_) if name == "buildkitd.sock" => return Ok(at),
                    Some(_) => {}
                }
            }
        }
    }
}
