//! The daemon's stdout and stderr: a pipe the shim reads, not a file the
//! daemon writes, so that a chatty daemon (`buildkitd --debug`, a build
//! printing gigabytes) cannot fill the node's disk through daemon.log.
//!
//! The shim appends what it reads to daemon.log up to the spec's
//! `log_cap_bytes`. Past the cap the output is counted and dropped, and one
//! note line at the end of the file says how much (rewritten in place as the
//! count grows, so it is current while the instance runs and final after the
//! teardown's drain). The pipe is drained either way, so the daemon never
//! blocks on it, and the last [`TAIL_BYTES`] are kept in memory: once bytes
//! were dropped, the file's end is no longer the output's end, and the
//! outcome's tail comes from here.

use super::RunError;
use crate::teardown::{self, TAIL_BYTES};
use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use nix::unistd::{pipe2, read};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes taken from the pipe per read.
const READ_BUF: usize = 64 << 10;
/// Most bytes one [`Output::pump`] takes, so that a daemon writing as fast
/// as the shim reads cannot starve the signals and the lifeline.
const PUMP_MAX: usize = 1 << 20;
const TAIL: usize = TAIL_BYTES as usize;

/// The read end of the daemon's output pipe and where its bytes go.
pub(super) struct Output {
    id: String,
    path: PathBuf,
    file: File,
    /// Read end, O_NONBLOCK.
    pipe: OwnedFd,
    cap: u64,
    /// Bytes in the file before the note (never more than `cap`).
    written: u64,
    /// Bytes read but not written to the file.
    dropped: u64,
    /// Bytes read in all.
    total: u64,
    /// The last byte written to the file, so the note starts a line.
    last: Option<u8>,
    /// The last bytes read, between TAIL and 2 * TAIL of them once full.
    tail: Vec<u8>,
    /// Every writer closed the pipe (or it failed): nothing more comes.
    eof: bool,
    /// A write to the file failed: nothing more is written but the note.
    stopped: bool,
    note_failed: bool,
    buf: Vec<u8>,
}

impl Output {
    /// Creates daemon.log (0600, truncated, never through a symlink) and the
    /// pipe, both close-on-exec. Returns the write end, for the child's
    /// stdout and stderr; the caller closes its copy once the child has one.
    pub fn open(id: &str, path: &Path, cap: u64) -> Result<(Output, OwnedFd), RunError> {
        let oflags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let file = open(path, oflags, Mode::from_bits_truncate(0o600))
            .map_err(|errno| RunError::Open { path: path.to_path_buf(), errno })?;
        let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|errno| RunError::Sys { what: "pipe2", errno })?;
        // Only the shim's end: the daemon's stays blocking, as a file was.
        let fl = fcntl(&r, FcntlArg::F_GETFL).map_err(|errno| RunError::Sys { what: "fcntl(F_GETFL)", errno })?;
        fcntl(&r, FcntlArg::F_SETFL(OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK))
            .map_err(|errno| RunError::Sys { what: "fcntl(F_SETFL, O_NONBLOCK)", errno })?;
        let out = Output {
            id: id.to_string(),
            path: path.to_path_buf(),
            file: File::from(file),
            pipe: r,
            cap,
            written: 0,
            dropped: 0,
            total: 0,
            last: None,
            tail: Vec::with_capacity(2 * TAIL),
            eof: false,
            stopped: false,
            note_failed: false,
            buf: vec![0; READ_BUF],
        };
        Ok((out, w))
    }

    /// The read end to poll, until EOF.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        (!self.eof).then(|| self.pipe.as_fd())
    }

    /// The read end's number, for the child to close.
    pub fn raw_fd(&self) -> RawFd {
        self.pipe.as_raw_fd()
    }

    /// Takes what the pipe holds now (up to [`PUMP_MAX`]) without blocking.
    pub fn pump(&mut self) {
        let dropped = self.dropped;
        let mut buf = std::mem::take(&mut self.buf);
        let mut got = 0;
        while !self.eof && got < PUMP_MAX {
            match read(&self.pipe, &mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    got += n;
                    self.take(&buf[..n]);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(errno) => {
                    crate::log!(self.id, "daemon output pipe: read: {errno}; no more output is taken");
                    self.eof = true;
                }
            }
        }
        self.buf = buf;
        if self.dropped != dropped {
            self.write_note();
        }
    }

    fn take(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        if chunk.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[chunk.len() - TAIL..]);
        } else {
            self.tail.extend_from_slice(chunk);
            if self.tail.len() > 2 * TAIL {
                self.tail.drain(..self.tail.len() - TAIL);
            }
        }
        let room = match self.stopped {
            true => 0,
            false => self.cap.saturating_sub(self.written).min(chunk.len() as u64) as usize,
        };
        let kept = self.append(&chunk[..room]);
        if kept < chunk.len() && self.dropped == 0 {
            crate::log!(
                self.id,
                "{}: capped at {} bytes; further daemon output is dropped (its last {TAIL} bytes go to the outcome)",
                self.path.display(),
                self.cap
            );
        }
        self.dropped += (chunk.len() - kept) as u64;
    }

    /// Writes `bytes` at the file's end; returns how many made it.
    fn append(&mut self, bytes: &[u8]) -> usize {
        let mut done = 0;
        while done < bytes.len() {
            match self.file.write_at(&bytes[done..], self.written) {
                Ok(0) => self.stop(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    done += n;
                    self.written += n as u64;
                    self.last = Some(bytes[done - 1]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.stop(e),
            }
            if self.stopped {
                break;
            }
        }
        done
    }

    /// A failed write (disk full, I/O error) ends the file's content there:
    /// what it holds stays a true prefix of the output.
    fn stop(&mut self, e: io::Error) {
        crate::log!(self.id, "{}: {e}; further daemon output is dropped", self.path.display());
        self.stopped = true;
    }

    /// The note after the kept bytes. The count only grows, so each note is
    /// at least as long as the one it overwrites and the file holds one.
    fn write_note(&mut self) {
        let nl = if self.last.is_some_and(|b| b != b'\n') { "\n" } else { "" };
        let note = format!("{nl}berth-shim: daemon.log capped at {} bytes; {} bytes dropped\n", self.cap, self.dropped);
        if let Err(e) = self.file.write_all_at(note.as_bytes(), self.written) {
            if !self.note_failed {
                crate::log!(self.id, "{}: writing the cap note: {e}", self.path.display());
                self.note_failed = true;
            }
        }
    }

    /// Waits up to `timeout` for output and takes it; just sleeps once the
    /// pipe is closed. For the waits of the teardown, so that a daemon
    /// logging its shutdown never blocks on a full pipe.
    pub fn wait(&mut self, timeout: Duration) {
        let Some(fd) = self.fd() else {
            std::thread::sleep(timeout);
            return;
        };
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        if poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], timeout).is_ok() {
            self.pump();
        }
    }

    /// After the daemon's end: takes what is left, until EOF or `bound`.
    /// The pid namespace's end closes every write end the daemon's tree
    /// held; only a descriptor passed out of the namespace could keep one
    /// open, and that is not waited for. Logs what the cap dropped.
    pub fn drain(&mut self, bound: Duration) {
        let deadline = Instant::now() + bound;
        loop {
            self.pump();
            if self.eof {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                crate::log!(
                    self.id,
                    "daemon output pipe still open {bound:?} after the daemon's end: not read further"
                );
                break;
            }
            self.wait(left);
        }
        if self.dropped > 0 {
            crate::log!(
                self.id,
                "{}: capped at {} bytes; {} of {} bytes of daemon output dropped",
                self.path.display(),
                self.cap,
                self.dropped,
                self.total
            );
        }
    }

    /// The outcome's tail when bytes were dropped (the file's end is then
    /// not the output's end); None when the file holds all of it.
    pub fn tail(&self) -> Option<String> {
        if self.dropped == 0 {
            return None;
        }
        let from = self.tail.len().saturating_sub(TAIL);
        let kept = &self.tail[from..];
        Some(teardown::tail_text(kept, self.total > kept.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::write;
    use std::fs;

    fn feed(out: &mut Output, w: &OwnedFd, bytes: &[u8]) {
        // Through the pipe in pieces that fit it, as a daemon would write.
        for piece in bytes.chunks(32 << 10) {
            let mut done = 0;
            while done < piece.len() {
                done += write(w, &piece[done..]).unwrap();
            }
            out.pump();
        }
    }

    #[test]
    fn below_the_cap_the_file_is_the_output_and_no_tail_is_kept() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("daemon.log");
        let (mut out, w) = Output::open("t", &p, 100).unwrap();
        feed(&mut out, &w, b"hello\nworld\n");
        drop(w);
        out.drain(Duration::from_secs(5));
        assert!(out.eof);
        assert_eq!(fs::read(&p).unwrap(), b"hello\nworld\n");
        assert_eq!(out.tail(), None);
    }

    #[test]
    fn past_the_cap_the_file_ends_in_one_current_note_and_the_tail_in_the_last_words() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("daemon.log");
        let (mut out, w) = Output::open("t", &p, 1000).unwrap();
        let mut all = Vec::new();
        for i in 0..20_000 {
            all.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        all.extend_from_slice(b"last words");
        feed(&mut out, &w, &all[..500]);
        assert_eq!(fs::read(&p).unwrap(), &all[..500]);
        feed(&mut out, &w, &all[500..]);
        drop(w);
        out.drain(Duration::from_secs(5));
        let file = fs::read(&p).unwrap();
        let dropped = all.len() - 1000;
        // The cut fell inside a line: the note starts its own.
        let note = format!("\nberth-shim: daemon.log capped at 1000 bytes; {dropped} bytes dropped\n");
        assert_eq!(&file[..1000], &all[..1000]);
        assert_eq!(String::from_utf8_lossy(&file[1000..]), note);
        let tail = out.tail().unwrap();
        assert!(tail.len() <= TAIL && tail.len() > TAIL - 20, "{}", tail.len());
        assert!(tail.starts_with("line ") && tail.ends_with("line 19999\nlast words"), "{tail:.40}");
    }

    #[test]
    fn a_cap_of_zero_keeps_only_the_note_and_a_short_output_whole_in_the_tail() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("daemon.log");
        let (mut out, w) = Output::open("t", &p, 0).unwrap();
        feed(&mut out, &w, b"one\ntwo\n");
        drop(w);
        out.drain(Duration::from_secs(5));
        assert_eq!(fs::read_to_string(&p).unwrap(), "berth-shim: daemon.log capped at 0 bytes; 8 bytes dropped\n");
        assert_eq!(out.tail().as_deref(), Some("one\ntwo"));
    }

    #[test]
    fn drain_gives_up_on_a_write_end_held_open() {
        let t = tempfile::tempdir().unwrap();
        let (mut out, w) = Output::open("t", &t.path().join("daemon.log"), 10).unwrap();
        feed(&mut out, &w, b"0123456789abc");
        // What the limit rules out is waiting forever for an EOF that never
        // comes (the write end stays open): drain on a thread, so that case
        // fails here instead of hanging the suite.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let started = Instant::now();
            out.drain(Duration::from_millis(100));
            let _ = tx.send((out, started.elapsed()));
        });
        let (out, took) = rx.recv_timeout(Duration::from_secs(120)).expect("drain gave up on the open write end");
        assert!(!out.eof && took >= Duration::from_millis(100), "{took:?}");
        assert_eq!(out.tail().as_deref(), Some("0123456789abc"));
        drop(w);
    }
}
