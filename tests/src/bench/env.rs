//! What the figures run on: a `berth-agent` of the bench's own
//! ([`BenchAgent`], cgroups under `berth-bench/`), a fakekitd started
//! directly ([`Direct`], the baselines), a gRPC connection that records when
//! the first byte from the daemon arrived ([`Conn`]), and a registry of
//! everything to undo ([`Undo`]) that runs on drop, on panic and on
//! SIGINT/SIGTERM.

use anyhow::{anyhow, bail, Context, Result};
use berth_tests::harness::{self, LeakScope};
use berth_tests::proto::fake::fake_client::FakeClient;
use berth_tests::proto::fake::{PingReply, PingRequest};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The first component of every cgroup parent the bench's agents use.
pub const CGROUP_TOP: &str = "berth-bench";
/// Ids per instance (one range each).
pub const IDS_PER_INSTANCE: u32 = 65536;
/// Bound on one call through the agent (spawn + ready + call).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Extra flags appended to every agent's command line (`--agent-arg`, for
/// experiments: later flags override earlier ones).
pub static EXTRA_AGENT_ARGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Progress line on stderr (the table goes to stdout).
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => { eprintln!("berth-bench: {}", format_args!($($arg)*)) };
}

// ---------------------------------------------------------------------------
// Undo registry

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

static UNDO: Mutex<Vec<(u64, Undo)>> = Mutex::new(Vec::new());
/// Set once a signal arrived: the signal thread undoes everything and exits.
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// Parks the calling thread for good once a signal arrived, so that it
/// neither creates anything more nor ends the process before the signal
/// thread has undone everything and exited.
pub fn park_if_shutting_down() {
    while SHUTTING_DOWN.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
static UNDO_SEQ: AtomicU64 = AtomicU64::new(1);

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

fn take(id: u64) -> Option<Undo> {
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

fn perform(u: &Undo) {
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

// ---------------------------------------------------------------------------
// Binaries and small /proc helpers

pub struct Bins {
    pub agent: PathBuf,
    pub shim: PathBuf,
    pub fakekitd: PathBuf,
}

impl Bins {
    /// The binaries beside the running `berth-bench` (or `$BERTH_BIN_DIR`).
    pub fn find() -> Result<Bins> {
        let dir = harness::bin_dir();
        let get = |n: &str| -> Result<PathBuf> {
            let p = dir.join(n);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{n} not found at {}: build with `cargo build --release --workspace --bins` \
                     (the profile of berth-bench), or set BERTH_BIN_DIR",
                    p.display()
                )
            }
        };
        Ok(Bins { agent: get("berth-agent")?, shim: get("berth-shim")?, fakekitd: get("fakekitd")? })
    }
}

/// `VmRSS` (or another `status` field given in kB) of `pid`, in bytes.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Proportional set size (shared pages divided among their users), bytes.
pub fn pss(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

pub fn rss(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS")
}

/// (ppid, comm) of `pid`.
pub fn stat_of(pid: u32) -> Option<(u32, String)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let ppid = s[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
    Some((ppid, comm))
}

/// User+system CPU time of `pid` so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = s.rfind(')')?;
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    // After ")": state(0) ppid(1) ... utime(11) stime(12).
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_secs_f64((ut + st) as f64 / hz as f64))
}

/// Children of `parent` whose comm is `comm`.
pub fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            if let Some((pp, c)) = stat_of(pid) {
                if pp == parent && c == comm {
                    out.push(pid);
                }
            }
        }
    }
    out
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// A fresh dir under the system temp dir (mode 0755: mapped uids traverse it),
/// removed by the returned guard.
pub fn temp_dir(prefix: &str) -> Result<(PathBuf, UndoGuard)> {
    let t = tempfile::Builder::new().prefix(prefix).tempdir().context("temp dir")?;
    let dir = t.keep();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    let dir = dir.canonicalize()?;
    let g = register(Undo::Dir(dir.clone()));
    Ok((dir, g))
}

// ---------------------------------------------------------------------------
// Logs of an agent

/// The agent's output lines, parsed, each with the instant it was read.
pub struct Logs {
    lines: Mutex<Vec<(Instant, Value, String)>>,
    notify: tokio::sync::Notify,
}

impl Logs {
    fn new() -> Arc<Logs> {
        Arc::new(Logs { lines: Mutex::new(Vec::new()), notify: tokio::sync::Notify::new() })
    }

    fn capture(self: &Arc<Self>, r: impl io::Read + Send + 'static, tag: String) {
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("log {tag}"))
            .spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let at = Instant::now();
                    if verbose() {
                        eprintln!("{tag} {line}");
                    }
                    let mut v = harness::parse_log_line(&line);
                    // A record spliced after a fragment of a shim's stderr
                    // line (berth-shim writes its lines in pieces, into the
                    // agent's stderr): salvage the record, mark it.
                    if v.get("raw").is_some() {
                        if let Some(k) = line.find("{\"timestamp\"").filter(|k| *k > 0) {
                            let rec = harness::parse_log_line(&line[k..]);
                            if rec.get("raw").is_none() {
                                v = rec;
                                v["garbled_prefix"] = Value::String(line[..k].to_string());
                            }
                        }
                    }
                    me.lines.lock().unwrap().push((at, v, line));
                    me.notify.notify_waiters();
                }
            })
            .expect("log thread");
    }

    pub fn mark(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    pub fn count(&self, from: usize, pred: impl Fn(&Value) -> bool) -> usize {
        self.lines.lock().unwrap().iter().skip(from).filter(|(_, v, _)| pred(v)).count()
    }

    /// Lines from `from` on whose raw text contains `needle`.
    pub fn raw_count(&self, from: usize, needle: &str) -> usize {
        self.lines.lock().unwrap().iter().skip(from).filter(|(_, _, l)| l.contains(needle)).count()
    }

    /// Lines from `from` on that hold a JSON log record (`{"timestamp"`)
    /// but do not parse: a record spliced with other output.
    pub fn garbled(&self, from: usize) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .skip(from)
            .filter(|(_, v, l)| {
                l.contains("{\"timestamp\"") && (v.get("raw").is_some() || v.get("garbled_prefix").is_some())
            })
            .map(|(_, _, l)| l.clone())
            .collect()
    }

    pub fn values(&self, from: usize) -> Vec<Value> {
        self.lines.lock().unwrap().iter().skip(from).map(|(_, v, _)| v.clone()).collect()
    }

    pub fn tail(&self, n: usize) -> String {
        let g = self.lines.lock().unwrap();
        let k = g.len().saturating_sub(n);
        g[k..].iter().map(|(_, _, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// The first line from `from` on matching `pred`, with when it was read.
    pub async fn wait(
        &self,
        from: usize,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<(Instant, Value)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if let Some(hit) =
                self.lines.lock().unwrap().iter().skip(from).find(|(_, v, _)| pred(v)).map(|(t, v, _)| (*t, v.clone()))
            {
                return Some(hit);
            }
            // Also wake periodically: a line may land between the check and the await.
            if tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + Duration::from_millis(50)), notified)
                .await
                .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return None;
            }
        }
    }

    /// Waits until at least `n` lines from `from` on match `pred`.
    pub async fn wait_count(&self, from: usize, n: usize, pred: impl Fn(&Value) -> bool, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if self.count(from, &pred) >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }
}

pub fn msg_is(v: &Value, m: &str) -> bool {
    v.get("message").and_then(Value::as_str) == Some(m)
}

pub fn is_instance_end(v: &Value) -> bool {
    msg_is(v, "instance ended")
}

pub fn instance_of(v: &Value) -> Option<&str> {
    v.get("instance").and_then(Value::as_str)
}

// ---------------------------------------------------------------------------
// The agent

static AGENT_SEQ: AtomicU64 = AtomicU64::new(0);

/// A `berth-agent run` with its own temp dir, state dir, socket, id pool and
/// cgroup parent `berth-bench/<name>-<pid>-<n>`. Dropping it kills it and
/// removes everything it left.
pub struct BenchAgent {
    child: Mutex<Child>,
    pub pid: u32,
    /// The pid for the undo registry; 0 once reaped.
    live_pid: Arc<AtomicU32>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub scope: LeakScope,
    pub logs: Arc<Logs>,
    _undo: UndoGuard,
}

impl BenchAgent {
    /// Starts an agent with `extra` flags after the common ones and waits
    /// until its socket listens. `ranges` id ranges of 65536 are leased to it.
    pub async fn start(bins: &Bins, name: &str, ranges: u32, extra: &[&str]) -> Result<BenchAgent> {
        let t = tempfile::Builder::new().prefix("berth-bench-").tempdir().context("temp dir")?;
        let dir = t.keep();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let dir = dir.canonicalize()?;
        let n = AGENT_SEQ.fetch_add(1, Ordering::SeqCst);
        let cgroup_parent = format!("{CGROUP_TOP}/{name}-{}-{n}", std::process::id());
        let count = ranges.max(1) * IDS_PER_INSTANCE;
        let base = harness::random_idmap_base(count);
        let socket = dir.join("berth.sock");
        let state_dir = dir.join("state");
        let scope = LeakScope {
            dir: dir.clone(),
            state_dir: state_dir.clone(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: cgroup_parent.clone(),
        };
        let mut args: Vec<OsString> = vec!["run".into()];
        let mut push = |k: &str, v: String| {
            args.push(k.into());
            args.push(v.into());
        };
        push("--listen", format!("unix://{}", socket.display()));
        push("--state-dir", state_dir.display().to_string());
        push("--cgroup-parent", cgroup_parent.clone());
        push("--idmap-base", base.to_string());
        push("--idmap-count", count.to_string());
        push("--daemon", bins.fakekitd.display().to_string());
        push("--shim", bins.shim.display().to_string());
        push("--log-format", "json".into());
        push("--http-addr", "off".into());
        push("--drain-timeout", "30s".into());
        args.extend(extra.iter().map(OsString::from));
        args.extend(EXTRA_AGENT_ARGS.lock().unwrap().iter().map(OsString::from));

        let mut cmd = Command::new(&bins.agent);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("BERTH_") {
                cmd.env_remove(&k);
            }
        }
        cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Registered before the spawn returns a pid: a scope without a pid
        // is cleaned as well (pid 0 is never signalled: kill(0) would hit
        // our own group, so it is replaced right after).
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                bail!("cannot start {}: {e}", bins.agent.display());
            }
        };
        let pid = child.id();
        let live_pid = Arc::new(AtomicU32::new(pid));
        let undo = register(Undo::Agent { pid: live_pid.clone(), scope: scope.clone() });
        let logs = Logs::new();
        logs.capture(child.stdout.take().unwrap(), format!("agent[{name}] stdout:"));
        logs.capture(child.stderr.take().unwrap(), format!("agent[{name}]:"));
        let agent = BenchAgent { child: Mutex::new(child), pid, live_pid, socket, state_dir, scope, logs, _undo: undo };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = agent.exited() {
                bail!("berth-agent exited with {st} before listening:\n{}", agent.logs.tail(30));
            }
            if harness::socket_listening(&agent.socket) {
                break;
            }
            if Instant::now() >= deadline {
                bail!("berth-agent did not listen within 20 s:\n{}", agent.logs.tail(30));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(agent)
    }

    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.lock().unwrap();
        let st = c.try_wait().ok().flatten();
        if st.is_some() {
            self.live_pid.store(0, Ordering::SeqCst);
        }
        st
    }

    /// Entries in `<state>/instances`.
    pub fn instance_count(&self) -> usize {
        fs::read_dir(self.state_dir.join("instances")).map(|rd| rd.flatten().count()).unwrap_or(0)
    }

    pub async fn wait_instances(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.instance_count();
            if have == n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{have} instances after {timeout:?}, want {n}:\n{}", self.logs.tail(20));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The leak scan of the harness over this agent's scope.
    pub fn leak_scan(&self) -> Vec<String> {
        harness::leak_scan(&self.scope, &[std::process::id(), self.pid])
    }

    pub async fn wait_clean(&self, timeout: Duration) -> Vec<String> {
        let every = Duration::from_millis(50);
        match harness::poll_async(timeout, every, || self.leak_scan().is_empty().then_some(())).await {
            Some(()) => Vec::new(),
            None => self.leak_scan(),
        }
    }

    /// SIGTERM (drain), wait for the exit, then the leak scan; returns the
    /// leaks (empty: clean). Everything is removed afterwards on drop.
    pub async fn stop(self) -> Result<Vec<String>> {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = self.exited() {
                break st;
            }
            if Instant::now() >= deadline {
                bail!("berth-agent did not exit within 60 s of SIGTERM:\n{}", self.logs.tail(20));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut leaks = self.wait_clean(Duration::from_secs(15)).await;
        if !status.success() {
            leaks.push(format!("agent exited with {status}"));
        }
        let left = self.logs.count(0, |v| msg_is(v, "instance left something behind"));
        if left > 0 {
            leaks.push(format!("{left} instances logged 'instance left something behind'"));
        }
        Ok(leaks)
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        // Kill and reap our child first (std skips the kill once reaped);
        // the undo guard then cleans the scope and the dir.
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if self.live_pid.swap(0, Ordering::SeqCst) != 0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// A timed gRPC connection

/// Records when the first bytes were read from the wrapped stream.
struct FirstByte {
    inner: UnixStream,
    first: Arc<OnceLock<Instant>>,
}

impl AsyncRead for FirstByte {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.first.get_or_init(Instant::now);
        }
        r
    }
}

impl AsyncWrite for FirstByte {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One HTTP/2 connection over a unix socket that knows when its first byte
/// arrived and can be shut down at once (both directions, so the peer sees
/// the close immediately, whatever the runtime does with the channel).
pub struct Conn {
    pub ch: Channel,
    first: Arc<OnceLock<Instant>>,
    fd: Arc<Mutex<Option<OwnedFd>>>,
}

impl Conn {
    pub async fn open(socket: &Path) -> Result<Conn> {
        let first = Arc::new(OnceLock::new());
        let fd: Arc<Mutex<Option<OwnedFd>>> = Arc::new(Mutex::new(None));
        let (f2, fd2, path) = (first.clone(), fd.clone(), socket.to_path_buf());
        let ch = Endpoint::from_static("http://bench.invalid")
            .connect_timeout(CALL_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let (first, fd, path) = (f2.clone(), fd2.clone(), path.clone());
                async move {
                    let s = UnixStream::connect(&path).await?;
                    *fd.lock().unwrap() = Some(s.as_fd().try_clone_to_owned()?);
                    Ok::<_, io::Error>(TokioIo::new(FirstByte { inner: s, first }))
                }
            }))
            .await
            .map_err(|e| anyhow!("connect {}: {}", socket.display(), berth_tests::grpc::error_chain(&e)))?;
        Ok(Conn { ch, first, fd })
    }

    pub fn fake(&self) -> FakeClient<Channel> {
        FakeClient::new(self.ch.clone())
            .max_decoding_message_size(berth_tests::grpc::MAX_MESSAGE)
            .max_encoding_message_size(berth_tests::grpc::MAX_MESSAGE)
    }

    pub fn first_byte(&self) -> Option<Instant> {
        self.first.get().copied()
    }

    pub async fn ping(&self) -> Result<PingReply> {
        match tokio::time::timeout(CALL_TIMEOUT, self.fake().ping(PingRequest {})).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => bail!("Ping: {:?}: {}", s.code(), s.message()),
            Err(_) => bail!("Ping: no reply within {CALL_TIMEOUT:?}"),
        }
    }

    /// Shuts the socket down both ways now, then drops the channel.
    pub fn close(self) {
        if let Some(fd) = self.fd.lock().unwrap().take() {
            let _ = nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&fd), nix::sys::socket::Shutdown::Both);
        }
    }
}

/// One start: connect (or spawn, for a direct daemon) to the first byte
/// from the daemon, and to the Ping reply.
#[derive(Debug, Clone, Copy)]
pub struct StartSample {
    pub first_byte_ms: f64,
    pub call_ms: f64,
    /// When the daemon's socket was bound (direct: its "serving on" line;
    /// berth: the socket file's inotify event), when known.
    pub bound_ms: Option<f64>,
}

/// Connects to `socket` (clock started at `t0`) and calls Fake.Ping.
pub async fn timed_ping(socket: &Path, t0: Instant) -> Result<(StartSample, PingReply, Conn)> {
    let conn = Conn::open(socket).await?;
    let reply = conn.ping().await?;
    let done = Instant::now();
    let fb = conn.first_byte().unwrap_or(done);
    let s = StartSample {
        first_byte_ms: fb.duration_since(t0).as_secs_f64() * 1e3,
        call_ms: done.duration_since(t0).as_secs_f64() * 1e3,
        bound_ms: None,
    };
    Ok((s, reply, conn))
}

// ---------------------------------------------------------------------------
// fakekitd started directly (the baselines)

/// A fakekitd run as a plain child of the bench: no namespaces, no cgroup.
pub struct Direct {
    child: tokio::process::Child,
    live_pid: Arc<AtomicU32>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    _stderr: Option<tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>>,
    /// When its "serving on" line was read.
    pub serving_at: Instant,
    _undo: UndoGuard,
}

impl Direct {
    /// Spawns fakekitd serving on `<dir>/buildkitd.sock` with `--root
    /// <dir>/root` and waits for its "serving on" line (it prints it once
    /// its socket listens), so no polling delay is added to the baseline.
    pub async fn spawn(fakekitd: &Path, dir: PathBuf) -> Result<Direct> {
        use tokio::io::AsyncBufReadExt;
        fs::create_dir_all(&dir)?;
        let socket = dir.join("buildkitd.sock");
        let mut child = tokio::process::Command::new(fakekitd)
            .arg("--addr")
            .arg(format!("unix://{}", socket.display()))
            .arg("--root")
            .arg(dir.join("root"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", fakekitd.display()))?;
        let live_pid = Arc::new(AtomicU32::new(child.id().unwrap_or(0)));
        let undo = register(Undo::Pid(live_pid.clone()));
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(l))) if l.contains("serving on") => break,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => bail!("fakekitd exited before serving"),
                Err(_) => bail!("fakekitd did not serve within {CALL_TIMEOUT:?}"),
            }
        }
        let serving_at = Instant::now();
        Ok(Direct { child, live_pid, dir, socket, _stderr: Some(lines), serving_at, _undo: undo })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, reap, remove its dir.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        // Killed: from here the undo registry must not signal the pid,
        // which is free for reuse once reaped.
        self.live_pid.store(0, Ordering::SeqCst);
        let _ = self.child.wait().await;
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A direct start: spawn fakekitd in `dir`, connect, Ping; clock from spawn.
pub async fn direct_start(fakekitd: &Path, dir: PathBuf) -> Result<(StartSample, Direct)> {
    let t0 = Instant::now();
    let d = Direct::spawn(fakekitd, dir).await?;
    let (mut s, _reply, conn) = timed_ping(&d.socket, t0).await?;
    s.bound_ms = Some(d.serving_at.duration_since(t0).as_secs_f64() * 1e3);
    drop(conn);
    Ok((s, d))
}

/// The instance id of a daemon from its `--root` (`<state>/instances/<id>/root`).
pub fn instance_id_of(reply: &PingReply) -> Option<String> {
    Path::new(&reply.root).parent()?.file_name().map(|s| s.to_string_lossy().into_owned())
}

/// The first host uid of a `uid_map` ("0 <host> <count>").
pub fn host_base(map: &str) -> Option<u32> {
    map.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------
// When does a new instance's daemon bind its socket?

/// Watches `<state>/instances` with inotify for the next instance dir and
/// reports when its daemon socket (`run/buildkitd.sock`) is created: the
/// moment the daemon has bound it, the same point at which a directly
/// started fakekitd prints "serving on". Call [`SocketWatch::arm`] before
/// connecting and [`SocketWatch::wait`] after.
pub struct SocketWatch {
    fd: OwnedFd,
    instances: PathBuf,
}

const IN_CREATE: u32 = 0x0000_0100;

impl SocketWatch {
    pub fn arm(instances: &Path) -> io::Result<SocketWatch> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscalls; the fd is owned right away.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let w = SocketWatch { fd, instances: instances.to_path_buf() };
        w.add(instances)?;
        Ok(w)
    }

    fn add(&self, p: &Path) -> io::Result<i32> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(std::os::fd::AsRawFd::as_raw_fd(&self.fd), c.as_ptr(), IN_CREATE) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(wd)
    }

    /// Blocks until the socket of the first instance dir created after
    /// `arm` exists; returns when that was seen.
    pub fn wait(self, timeout: Duration) -> io::Result<Instant> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + timeout;
        let mut dir: Option<PathBuf> = None;
        let mut run_watched = false;
        let mut buf = vec![0u8; 64 * 1024];
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
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
            // SAFETY: reading into our buffer from our fd.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                continue;
            }
            let at = Instant::now();
            let mut off = 0usize;
            while off + 16 <= n as usize {
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
                let name_raw = &buf[off + 16..off + 16 + len];
                let name = String::from_utf8_lossy(name_raw.split(|b| *b == 0).next().unwrap_or(&[])).into_owned();
                off += 16 + len;
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
