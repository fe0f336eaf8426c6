//! Drives the real binaries for the end-to-end suites: a `berth-agent run` in
//! a fresh temp environment ([`Agent`]), a scan for anything an instance could
//! leave behind ([`Agent::leak_scan`]), and `fakeclient` runs as separate
//! client processes ([`fakeclient`], [`run_fakeclient`]).
//!
//! The binaries are looked up in the target profile dir of the running test
//! executable (`target/<profile>/deps/<test>` -> `target/<profile>/`); build
//! them first with `cargo build --workspace --bins` (or set `BERTH_BIN_DIR`).

use serde_json::Value;
use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long [`AgentBuilder::start`] and [`Agent::restart`] wait for the socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Ids per instance; the agent gets 8 instances' worth by default.
pub const IDS_PER_INSTANCE: u32 = 65536;
/// Default `--idmap-count`.
pub const DEFAULT_IDMAP_COUNT: u32 = 8 * IDS_PER_INSTANCE;

// ---------------------------------------------------------------------------
// Binaries

/// The dir holding the workspace's binaries: `$BERTH_BIN_DIR`, or the profile
/// dir of the current executable (`target/debug` for `target/debug/deps/x`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BERTH_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    dir
}

/// Path of the workspace binary `name` (`berth-agent`, `berth-shim`,
/// `fakekitd`, `fakeclient`); panics with what to do when it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    if !p.is_file() {
        panic!(
            "binary {name} not found at {}: run `cargo build --workspace --bins` first \
             (same profile as the tests), or set BERTH_BIN_DIR",
            p.display()
        );
    }
    p
}

// ---------------------------------------------------------------------------
// fakeclient as a separate process

/// A finished fakeclient (or any JSON-printing command) run.
#[derive(Debug, Clone)]
pub struct ClientRun {
    pub status: ExitStatus,
    /// The last stdout line parsed as JSON (`Value::Null` if none parsed).
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl ClientRun {
    /// The gRPC code name of a failed call (`"ResourceExhausted"`), if it failed.
    pub fn error_code(&self) -> Option<&str> {
        self.json.pointer("/error/code").and_then(Value::as_str)
    }
    pub fn error_message(&self) -> Option<&str> {
        self.json.pointer("/error/message").and_then(Value::as_str)
    }
    pub fn ok(&self) -> bool {
        // A failed call prints `{"error": {"code", "message"}}`; a reply may
        // carry its own string `error` field (Fork's), which is no failure.
        self.status.success() && !self.json.get("error").is_some_and(Value::is_object)
    }
}

/// A `fakeclient --socket <socket>` command to add a subcommand to (and, e.g.,
/// `CommandExt::uid` to act as another client).
pub fn fakeclient(socket: &Path) -> Command {
    let mut c = Command::new(bin_path("fakeclient"));
    c.arg("--socket").arg(socket);
    c
}

/// Runs `cmd` to completion, capturing stdout/stderr and parsing the last
/// stdout line as JSON.
pub fn run_json(mut cmd: Command) -> ClientRun {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    ClientRun { status: out.status, json, stdout, stderr }
}

/// `fakeclient --socket <socket> <args...>`, run to completion.
pub fn run_fakeclient(socket: &Path, args: &[&str]) -> ClientRun {
    let mut c = fakeclient(socket);
    c.args(args);
    run_json(c)
}

// ---------------------------------------------------------------------------
// Log capture

struct LogInner {
    lines: Vec<String>,
    values: Vec<Value>,
}

/// Calls `f` every `every` until it yields a value or `timeout` passes
/// (then one last call decides).
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// [`poll`] without blocking the async runtime.
pub async fn poll_async<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Lines of a child's stdout+stderr, parsed as JSON objects, shared with the
/// reader threads.
pub struct LogBuf {
    inner: Mutex<LogInner>,
    cond: Condvar,
}

/// Parses a log line; tracing's `fields` object (when not flattened) and the
/// fields of the enclosing `span`/`spans` are merged into the top level (an
/// event's own fields win), so `v["instance"]` works either way. A line
/// that is not JSON becomes `{"message": line, "raw": true}`.
pub fn parse_log_line(line: &str) -> Value {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(mut o)) => {
            if let Some(Value::Object(fields)) = o.get("fields").cloned() {
                for (k, v) in fields {
                    o.entry(k).or_insert(v);
                }
            }
            // Fields of the current span, then of the outer ones (innermost wins).
            let mut spans: Vec<Value> = o.get("span").cloned().into_iter().collect();
            if let Some(Value::Array(list)) = o.get("spans") {
                spans.extend(list.iter().rev().cloned());
            }
            for span in spans {
                if let Value::Object(fields) = span {
                    for (k, v) in fields {
                        if k != "name" {
                            o.entry(k).or_insert(v);
                        }
                    }
                }
            }
            Value::Object(o)
        }
        _ => serde_json::json!({"message": line, "raw": true}),
    }
}

impl LogBuf {
    fn new() -> Arc<LogBuf> {
        Arc::new(LogBuf { inner: Mutex::new(LogInner { lines: Vec::new(), values: Vec::new() }), cond: Condvar::new() })
    }

    fn push(&self, line: String) {
        let v = parse_log_line(&line);
        let mut g = self.inner.lock().unwrap();
        g.lines.push(line);
        g.values.push(v);
        self.cond.notify_all();
    }

    /// Spawns a thread copying `r` line by line into the buffer and onto the
    /// test's stderr, prefixed with `tag`.
    fn capture(self: &Arc<Self>, r: impl Read + Send + 'static, tag: String) {
        let buf = self.clone();
        std::thread::Builder::new()
            .name(format!("log {tag}"))
            .spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("{tag} {line}");
                    buf.push(line);
                }
            })
            .expect("spawn log thread");
    }

    fn len(&self) -> usize {
        self.inner.lock().unwrap().values.len()
    }

    fn find_from(&self, from: usize, pred: &dyn Fn(&Value) -> bool) -> Option<Value> {
        let g = self.inner.lock().unwrap();
        g.values.iter().skip(from).find(|v| pred(v)).cloned()
    }

    fn wait(&self, from: usize, pred: &dyn Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let mut g = self.inner.lock().unwrap();
        let mut seen = from;
        loop {
            if let Some(v) = g.values.iter().skip(seen).find(|v| pred(v)) {
                return Some(v.clone());
            }
            seen = g.values.len().max(from);
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self.cond.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}

// ---------------------------------------------------------------------------
// Agent

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_ok() {
        return u64::from_le_bytes(b);
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    t.as_nanos() as u64 ^ ((std::process::id() as u64) << 40)
}

/// A random multiple of 65536 in [2^24, 2^31) such that `base + count <= 2^31`.
pub fn random_idmap_base(count: u32) -> u32 {
    let lo = (1u64 << 24) / 65536;
    let hi = ((1u64 << 31) - count as u64) / 65536; // exclusive upper slot
    let slot = lo + random_u64() % (hi - lo);
    (slot * 65536) as u32
}

fn sanitize(name: &str) -> String {
    let s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    s.chars().take(40).collect()
}

/// Builds an [`Agent`]; see [`Agent::builder`].
pub struct AgentBuilder {
    name: String,
    extra: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    daemon: Option<PathBuf>,
    shim: Option<PathBuf>,
    idmap: Option<(u32, u32)>,
    cgroup_root: PathBuf,
    dir_args: Vec<(String, String)>,
}

impl AgentBuilder {
    /// An extra argument after the defaults (e.g. `.arg("--idle-timeout").arg("2s")`).
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.extra.push(a.as_ref().to_owned());
        self
    }
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.extra.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }
    /// `--daemon-arg=<a>` (the `=` form, so values starting with `-` work).
    /// A flag whose value is a path inside the agent's temp dir, known only
    /// at spawn (`.dir_arg("--run-dir", "run")` gives `--run-dir <tmp>/run`).
    pub fn dir_arg(mut self, flag: &str, rel: &str) -> Self {
        self.dir_args.push((flag.to_string(), rel.to_string()));
        self
    }

    pub fn daemon_arg(mut self, a: &str) -> Self {
        self.extra.push(format!("--daemon-arg={a}").into());
        self
    }
    /// An environment variable for the agent (the rest is inherited).
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env.push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }
    /// `--daemon` other than fakekitd.
    pub fn daemon(mut self, p: impl Into<PathBuf>) -> Self {
        self.daemon = Some(p.into());
        self
    }
    /// `--shim` other than berth-shim.
    pub fn shim(mut self, p: impl Into<PathBuf>) -> Self {
        self.shim = Some(p.into());
        self
    }
    /// A fixed `--idmap-base`/`--idmap-count` instead of a random base.
    pub fn idmap(mut self, base: u32, count: u32) -> Self {
        self.idmap = Some((base, count));
        self
    }
    /// `--cgroup-root` (default `/sys/fs/cgroup`, not passed); the leak scan looks there too.
    pub fn cgroup_root(mut self, p: impl Into<PathBuf>) -> Self {
        self.cgroup_root = p.into();
        self
    }

    /// Starts the agent without waiting for its socket (for start failures).
    pub fn spawn(self) -> Agent {
        let tmp = tempfile::Builder::new().prefix("berth-").tempdir().expect("tempdir");
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
        let dir = tmp.path().canonicalize().expect("canonical tempdir");
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let cgroup_parent = format!("berth-test/{}-{}-{}", sanitize(&self.name), std::process::id(), n);
        let (idmap_base, idmap_count) = self.idmap.unwrap_or_else(|| {
            let count = DEFAULT_IDMAP_COUNT;
            (random_idmap_base(count), count)
        });
        let socket = dir.join("berth.sock");
        let state_dir = dir.join("state");
        let daemon = self.daemon.unwrap_or_else(|| bin_path("fakekitd"));
        let shim = self.shim.unwrap_or_else(|| bin_path("berth-shim"));

        let mut args: Vec<OsString> = vec!["run".into()];
        let mut push = |k: &str, v: &OsStr| {
            args.push(k.into());
            args.push(v.to_owned());
        };
        push("--listen", OsStr::new(&format!("unix://{}", socket.display())));
        push("--state-dir", state_dir.as_os_str());
        push("--cgroup-parent", OsStr::new(&cgroup_parent));
        push("--idmap-base", OsStr::new(&idmap_base.to_string()));
        push("--idmap-count", OsStr::new(&idmap_count.to_string()));
        push("--daemon", daemon.as_os_str());
        push("--shim", shim.as_os_str());
        push("--log-format", OsStr::new("json"));
        if self.cgroup_root != Path::new("/sys/fs/cgroup") {
            push("--cgroup-root", self.cgroup_root.as_os_str());
        }
        for (flag, rel) in &self.dir_args {
            let v = if flag == "--csi-endpoint" || flag == "--listen" {
                format!("unix://{}", dir.join(rel).display())
            } else {
                dir.join(rel).display().to_string()
            };
            args.push(flag.into());
            args.push(v.into());
        }
        args.extend(self.extra);

        let agent = Agent {
            exe: bin_path("berth-agent"),
            args,
            env: self.env,
            dir,
            socket,
            state_dir,
            cgroup_parent,
            cgroup_root: self.cgroup_root,
            idmap_base,
            idmap_count,
            logs: LogBuf::new(),
            proc: Mutex::new(None),
            _tmp: tmp,
        };
        agent.spawn_process();
        agent
    }

    /// Starts the agent and waits (up to 20 s) until its socket accepts
    /// connections; panics with the agent's output otherwise.
    pub fn start(self) -> Agent {
        let a = self.spawn();
        if let Err(e) = a.wait_ready(START_TIMEOUT) {
            panic!("{e}");
        }
        a
    }

    /// [`start`](Self::start) without blocking the async runtime while waiting.
    pub async fn start_async(self) -> Agent {
        let a = self.spawn();
        if let Err(e) = a.wait_ready_async(START_TIMEOUT).await {
            panic!("{e}");
        }
        a
    }
}

struct Proc {
    child: Child,
    status: Option<ExitStatus>,
}

/// A running `berth-agent run` in its own temp environment. Dropping it
/// SIGKILLs the agent and cleans up (best effort) what it left: processes,
/// mounts and cgroups of its test parent.
pub struct Agent {
    exe: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: PathBuf,
    socket: PathBuf,
    state_dir: PathBuf,
    cgroup_parent: String,
    cgroup_root: PathBuf,
    idmap_base: u32,
    idmap_count: u32,
    logs: Arc<LogBuf>,
    proc: Mutex<Option<Proc>>,
    _tmp: TempDir,
}

impl Agent {
    /// A builder for an agent named after the test (`name` goes into the
    /// unique cgroup parent `berth-test/<name>-<pid>-<n>`).
    pub fn builder(name: &str) -> AgentBuilder {
        AgentBuilder {
            name: name.to_string(),
            extra: Vec::new(),
            dir_args: Vec::new(),
            env: Vec::new(),
            daemon: None,
            shim: None,
            idmap: None,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        }
    }

    /// `Agent::builder(name).start()`.
    pub fn start(name: &str) -> Agent {
        Agent::builder(name).start()
    }

    /// The agent's command line, environment and pipes.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        // The agent reads BERTH_* settings from the environment: none leak in
        // from the test's own environment, and the HTTP endpoint (default
        // 0.0.0.0:9411, which parallel agents would fight over) takes an
        // ephemeral loopback port; see `http_addr`.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("BERTH_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env("BERTH_HTTP_ADDR", "127.0.0.1:0");
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn spawn_process(&self) {
        let mut cmd = self.command();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", self.exe.display()));
        let pid = child.id();
        eprintln!("harness: started agent pid {pid}: {cmd:?}");
        self.logs.capture(child.stdout.take().unwrap(), format!("agent[{pid}] stdout:"));
        self.logs.capture(child.stderr.take().unwrap(), format!("agent[{pid}]:"));
        *self.proc.lock().unwrap() = Some(Proc { child, status: None });
    }

    /// The temp dir everything lives in (mode 0755, canonical path).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The agent's node socket (`--listen unix://<dir>/berth.sock`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }
    /// `--state-dir` (`<dir>/state`).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
    /// `--cgroup-parent` (`berth-test/<name>-<pid>-<n>`).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }
    /// `(--idmap-base, --idmap-count)`.
    pub fn idmap(&self) -> (u32, u32) {
        (self.idmap_base, self.idmap_count)
    }
    /// The full argv after the binary (for messages).
    pub fn command_line(&self) -> Vec<OsString> {
        self.args.clone()
    }

    /// The pid of the current agent process while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        let mut g = self.proc.lock().unwrap();
        let p = g.as_mut()?;
        if p.status.is_none() {
            if let Ok(Some(st)) = p.child.try_wait() {
                p.status = Some(st);
            }
        }
        p.status.is_none().then(|| p.child.id())
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }
    pub fn sigterm(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM)
    }
    pub fn sigkill(&self) {
        self.signal(nix::sys::signal::Signal::SIGKILL)
    }

    /// The exit status once the agent has exited (non-blocking).
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        let mut g = self.proc.lock().unwrap();
        let p = g.as_mut()?;
        if p.status.is_none() {
            if let Ok(Some(st)) = p.child.try_wait() {
                p.status = Some(st);
            }
        }
        p.status
    }

    /// Waits up to `timeout` for the agent to exit; `None` if still running.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        poll(timeout, Duration::from_millis(20), || self.try_exit_status())
    }

    /// [`wait_exit`](Self::wait_exit) without blocking the async runtime.
    pub async fn wait_exit_async(&self, timeout: Duration) -> Option<ExitStatus> {
        poll_async(timeout, Duration::from_millis(20), || self.try_exit_status()).await
    }

    fn ready_now(&self) -> Result<bool, String> {
        if let Some(st) = self.try_exit_status() {
            return Err(format!(
                "berth-agent exited with {st} before its socket {} accepted connections; output:\n{}",
                self.socket.display(),
                self.log_tail(40)
            ));
        }
        Ok(socket_listening(&self.socket))
    }

    fn not_ready(&self, timeout: Duration) -> String {
        format!(
            "berth-agent (pid {:?}) socket {} did not accept connections within {timeout:?}; output:\n{}",
            self.pid(),
            self.socket.display(),
            self.log_tail(40)
        )
    }

    /// Waits until the socket is listening (see [`socket_listening`]: no
    /// connection is made); an error (with the agent's
    /// last output) if the agent exits first or `timeout` passes.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ready_now()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(timeout));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub async fn wait_ready_async(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ready_now()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(timeout));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn kill_and_reap(&self) {
        let mut g = self.proc.lock().unwrap();
        if let Some(p) = g.as_mut() {
            if p.status.is_none() {
                let _ = p.child.kill();
                p.status = p.child.wait().ok();
            }
        }
    }

    /// A new agent process on the same dirs and arguments (the old one is
    /// SIGKILLed first if still running); waits until its socket accepts.
    /// Logs accumulate: use [`log_mark`](Self::log_mark) before to scope
    /// [`wait_log_since`](Self::wait_log_since) to the new process.
    pub fn restart(&self) {
        self.kill_and_reap();
        self.spawn_process();
        if let Err(e) = self.wait_ready(START_TIMEOUT) {
            panic!("restart: {e}");
        }
    }

    /// [`restart`](Self::restart) without blocking the async runtime while waiting.
    pub async fn restart_async(&self) {
        self.kill_and_reap();
        self.spawn_process();
        if let Err(e) = self.wait_ready_async(START_TIMEOUT).await {
            panic!("restart: {e}");
        }
    }

    // --- logs

    /// Every captured line (stdout and stderr, all agent processes so far), parsed.
    pub fn logs(&self) -> Vec<Value> {
        self.logs.inner.lock().unwrap().values.clone()
    }
    /// The raw captured lines.
    pub fn log_lines(&self) -> Vec<String> {
        self.logs.inner.lock().unwrap().lines.clone()
    }
    /// The last `n` raw lines, newline-joined (for panic messages).
    pub fn log_tail(&self, n: usize) -> String {
        let g = self.logs.inner.lock().unwrap();
        let k = g.lines.len().saturating_sub(n);
        g.lines[k..].join("\n")
    }
    /// The number of lines so far: a mark for [`wait_log_since`](Self::wait_log_since).
    pub fn log_mark(&self) -> usize {
        self.logs.len()
    }
    /// The first line (from the start) matching `pred`, waiting up to `timeout` for it.
    pub fn wait_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        self.logs.wait(0, &pred, timeout)
    }
    /// Like [`wait_log`](Self::wait_log), looking only at lines from `mark` on.
    pub fn wait_log_since(&self, mark: usize, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        self.logs.wait(mark, &pred, timeout)
    }
    /// [`wait_log_since`](Self::wait_log_since) without blocking the async runtime.
    pub async fn wait_log_async(&self, mark: usize, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.logs.find_from(mark, &pred) {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    /// The address the agent's HTTP endpoint (/healthz, /readyz, /metrics)
    /// bound, from its log line with an `http_addr` field (the latest agent
    /// process's, after a restart); `None` if not logged within `timeout`.
    pub fn http_addr(&self, timeout: Duration) -> Option<std::net::SocketAddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .logs()
                .iter()
                .rev()
                .find_map(|v| v.get("http_addr").and_then(Value::as_str).and_then(|a| a.parse().ok()));
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every "instance ended" line so far.
    pub fn instance_ends(&self) -> Vec<Value> {
        self.logs().into_iter().filter(is_instance_end).collect()
    }

    // --- leaks

    /// What an instance of this agent could leave behind, one human-readable
    /// line each; empty means clean. See [`leak_scan`].
    pub fn leak_scan(&self) -> Vec<String> {
        let mut exclude = vec![std::process::id()];
        exclude.extend(self.pid());
        leak_scan(&self.scope(), &exclude)
    }

    /// Polls [`leak_scan`](Self::leak_scan) until it is empty or `timeout`
    /// passes (reaping is asynchronous); returns the last result.
    pub fn wait_clean(&self, timeout: Duration) -> Vec<String> {
        let clean = poll(timeout, Duration::from_millis(50), || self.leak_scan().is_empty().then_some(()));
        if clean.is_some() {
            Vec::new()
        } else {
            self.leak_scan()
        }
    }

    pub async fn wait_clean_async(&self, timeout: Duration) -> Vec<String> {
        let clean = poll_async(timeout, Duration::from_millis(50), || self.leak_scan().is_empty().then_some(())).await;
        if clean.is_some() {
            Vec::new()
        } else {
            self.leak_scan()
        }
    }

    /// The paths the leak scan looks at.
    pub fn scope(&self) -> LeakScope {
        LeakScope {
            dir: self.dir.clone(),
            state_dir: self.state_dir.clone(),
            cgroup_root: self.cgroup_root.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
        }
    }
}

/// Whether a unix socket bound at `path` is listening, from `/proc/net/unix`
/// (the `__SO_ACCEPTCON` flag), without connecting to it: a connection to the
/// agent is a client, and in client scope it would start an instance that
/// takes a build slot until its idle timeout. Falls back to a connect when
/// `/proc/net/unix` cannot be read.
pub fn socket_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let Ok(text) = fs::read_to_string("/proc/net/unix") else {
        return std::os::unix::net::UnixStream::connect(path).is_ok();
    };
    let want = path.to_string_lossy();
    let suffix = format!(" {want}");
    text.lines().skip(1).any(|l| {
        // Num RefCount Protocol Flags Type St Inode [Path] (the path may hold spaces)
        let flags = l.split_whitespace().nth(3).and_then(|x| u32::from_str_radix(x, 16).ok()).unwrap_or(0);
        flags & SO_ACCEPTCON != 0 && l.ends_with(&suffix)
    })
}

/// True for the agent's "instance ended" log line.
pub fn is_instance_end(v: &Value) -> bool {
    v.get("message").and_then(Value::as_str) == Some("instance ended")
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill_and_reap();
        cleanup(&self.scope());
    }
}

// ---------------------------------------------------------------------------
// Leak scan and cleanup

/// What a leak scan looks at: one agent's temp dir, state dir and cgroup parent.
#[derive(Debug, Clone)]
pub struct LeakScope {
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub cgroup_root: PathBuf,
    /// Relative, e.g. `berth-test/x-123-0`.
    pub cgroup_parent: String,
}

/// `(controller list, path)` entries of `/proc/<pid>/cgroup`.
fn proc_cgroups(pid: &str) -> Vec<(String, String)> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, c, p) = (it.next()?, it.next()?, it.next()?);
            Some((c.to_string(), p.to_string()))
        })
        .collect()
}

/// The dirs our cgroup parent can be at: `<hierarchy>/<parent>` (where the
/// agent puts it with `--cgroup-parent`) and `<hierarchy>/<own cgroup>/<parent>`,
/// for every v1 hierarchy, or the v2 root on a pure v2 host.
pub fn cgroup_parent_dirs(root: &Path, parent: &str) -> Vec<PathBuf> {
    let own = proc_cgroups("self");
    let parent = parent.trim_start_matches('/');
    let mut out = BTreeSet::new();
    let mut add = |h: &Path, own_path: Option<&str>| {
        out.insert(h.join(parent));
        if let Some(o) = own_path {
            let o = o.trim_start_matches('/');
            if !o.is_empty() {
                out.insert(h.join(o).join(parent));
            }
        }
    };
    if root.join("cgroup.controllers").exists() {
        let o = own.iter().find(|(c, _)| c.is_empty()).map(|(_, p)| p.as_str());
        add(root, o);
    } else if let Ok(rd) = fs::read_dir(root) {
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue; // co-mount aliases (cpu -> cpu,cpuacct) are symlinks
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let o = own.iter().find(|(c, _)| match name.as_str() {
                "unified" => c.is_empty(),
                n => {
                    let mut a: Vec<&str> = c.split(',').map(|x| x.trim_start_matches("name=")).collect();
                    let mut b: Vec<&str> = n.split(',').collect();
                    a.sort_unstable();
                    b.sort_unstable();
                    a == b
                }
            });
            add(&e.path(), o.map(|(_, p)| p.as_str()));
        }
    }
    out.into_iter().collect()
}

/// Every dir below `dir`, deepest first.
fn subdirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                    out.push(e.path());
                }
            }
        }
    }
    walk(dir, &mut out);
    out
}

fn cgroup_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn cmdline(pid: &str) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

/// Processes that belong to the scope: their command line names the temp
/// dir, or they sit in a cgroup below the parent. fakeclient processes (test
/// clients, not instance leftovers) and `exclude` are skipped.
fn scope_processes(scope: &LeakScope, exclude: &[u32]) -> Vec<(u32, String)> {
    let dir = scope.dir.to_string_lossy().into_owned();
    let parent = format!("/{}", scope.cgroup_parent.trim_matches('/'));
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        if exclude.contains(&pid) {
            continue;
        }
        let Some(argv) = cmdline(&name) else { continue };
        if argv.first().is_some_and(|a| Path::new(a).file_name() == Some(OsStr::new("fakeclient"))) {
            continue;
        }
        let joined = argv.join(" ");
        let why = if joined.contains(&dir) {
            Some("command line names the test dir".to_string())
        } else {
            proc_cgroups(&name)
                .into_iter()
                .find(|(_, p)| {
                    p == &parent || p.starts_with(&format!("{parent}/")) || p.contains(&format!("{parent}/"))
                })
                .map(|(c, p)| format!("in cgroup {c}:{p}"))
        };
        if let Some(why) = why {
            out.push((pid, format!("process {pid} ({}) still running: {why}", truncate(&joined, 200))));
        }
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut k = n;
        while !s.is_char_boundary(k) {
            k -= 1;
        }
        format!("{}...", &s[..k])
    }
}

/// Unescapes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points (in this process's mount namespace) under `dir`, in mount order.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape_mount))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Every non-dir entry below `dir` (not following symlinks).
fn files_below(dir: &Path, out: &mut Vec<(PathBuf, fs::FileType)>) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                files_below(&e.path(), out);
            } else {
                out.push((e.path(), ft));
            }
        }
    }
}

/// Scans for what an instance could leave: processes (command line naming
/// the temp dir, or in a cgroup below the parent; `exclude` and fakeclient
/// runs skipped), cgroup dirs below the parent in every hierarchy, mounts
/// under the temp dir, entries of `<state>/instances`, files under
/// `<state>/leases`, and socket files under the state dir.
pub fn leak_scan(scope: &LeakScope, exclude: &[u32]) -> Vec<String> {
    let mut out: Vec<String> = scope_processes(scope, exclude).into_iter().map(|(_, s)| s).collect();

    for parent in cgroup_parent_dirs(&scope.cgroup_root, &scope.cgroup_parent) {
        for d in subdirs_deepest_first(&parent) {
            let procs = cgroup_procs(&d);
            out.push(if procs.is_empty() {
                format!("cgroup left: {}", d.display())
            } else {
                format!("cgroup left: {} (procs {procs:?})", d.display())
            });
        }
    }

    for m in mounts_under(&scope.dir) {
        out.push(format!("mount left: {}", m.display()));
    }

    if let Ok(rd) = fs::read_dir(scope.state_dir.join("instances")) {
        for e in rd.flatten() {
            out.push(format!("instance entry left: {}", e.path().display()));
        }
    }

    let mut leases = Vec::new();
    files_below(&scope.state_dir.join("leases"), &mut leases);
    for (p, _) in leases {
        out.push(format!("lease file left: {}", p.display()));
    }

    let mut files = Vec::new();
    files_below(&scope.state_dir, &mut files);
    for (p, ft) in files {
        if ft.is_socket() {
            out.push(format!("socket left: {}", p.display()));
        }
    }
    out
}

/// Best-effort removal of everything in the scope: kills its processes,
/// detaches its mounts, empties and removes its cgroups (including the parent
/// dir itself, and `berth-test` when it is empty).
pub fn cleanup(scope: &LeakScope) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let me = [std::process::id()];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let procs = scope_processes(scope, &me);
        if procs.is_empty() || Instant::now() >= deadline {
            break;
        }
        for (pid, _) in procs {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    for m in mounts_under(&scope.dir).into_iter().rev() {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }

    for parent in cgroup_parent_dirs(&scope.cgroup_root, &scope.cgroup_parent) {
        if !parent.exists() {
            continue;
        }
        let mut dirs = subdirs_deepest_first(&parent);
        dirs.push(parent.clone());
        for d in dirs {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                for pid in cgroup_procs(&d) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => {
                        eprintln!("harness: cannot remove cgroup {}: {e}", d.display());
                        break;
                    }
                }
            }
        }
        // The shared first component (`berth-test`): only when empty; other
        // tests running in parallel may still use it.
        let mut up = parent.parent();
        let depth = Path::new(&scope.cgroup_parent).components().count();
        for _ in 1..depth {
            match up {
                Some(p) => {
                    if fs::remove_dir(p).is_err() {
                        break;
                    }
                    up = p.parent();
                }
                None => break,
            }
        }
    }
}

/// A second agent process on the same dirs and sockets as an [`Agent`], as a
/// DaemonSet rollout with `maxSurge: 1` starts one beside the old.
pub struct Sibling {
    child: Mutex<Child>,
    logs: Arc<LogBuf>,
}

impl Agent {
    /// Starts another `berth-agent` with this agent's exact command line;
    /// it logs into its own buffer.
    pub fn spawn_sibling(&self) -> Sibling {
        let mut cmd = self.command();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", self.exe.display()));
        let pid = child.id();
        let logs = LogBuf::new();
        logs.capture(child.stdout.take().unwrap(), format!("sibling[{pid}] stdout:"));
        logs.capture(child.stderr.take().unwrap(), format!("sibling[{pid}]:"));
        Sibling { child: Mutex::new(child), logs }
    }
}

impl Sibling {
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }
    pub fn sigterm(&self) {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), nix::sys::signal::Signal::SIGTERM);
    }
    pub fn wait_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        self.logs.wait(0, &pred, timeout)
    }
    pub fn logs(&self) -> Vec<Value> {
        self.logs.inner.lock().unwrap().values.clone()
    }
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        poll(timeout, Duration::from_millis(20), || self.child.lock().unwrap().try_wait().ok().flatten())
    }
}

impl Drop for Sibling {
    fn drop(&mut self) {
        let mut c = self.child.lock().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idmap_base_is_aligned_and_in_range() {
        for _ in 0..1000 {
            let b = random_idmap_base(DEFAULT_IDMAP_COUNT) as u64;
            assert_eq!(b % 65536, 0);
            assert!(b >= 1 << 24);
            assert!(b + DEFAULT_IDMAP_COUNT as u64 <= 1 << 31, "{b}");
        }
    }

    #[test]
    fn log_lines_are_flattened() {
        let v = parse_log_line(r#"{"level":"INFO","fields":{"message":"instance ended","instance":"a1"}}"#);
        assert!(is_instance_end(&v));
        assert_eq!(v["instance"], "a1");
        let flat = parse_log_line(r#"{"level":"INFO","message":"x","instance":"b"}"#);
        assert_eq!(flat["instance"], "b");
        let spanned = parse_log_line(
            r#"{"message":"instance ready","span":{"instance":"c","name":"instance"},"spans":[{"client":"uid=0","name":"outer"}]}"#,
        );
        assert_eq!((spanned["instance"].as_str(), spanned["client"].as_str()), (Some("c"), Some("uid=0")));
        assert!(spanned.get("name").is_none());
        let raw = parse_log_line("panic: boom");
        assert_eq!(raw["message"], "panic: boom");
        assert_eq!(raw["raw"], true);
    }

    #[test]
    fn socket_listening_needs_a_listener_and_does_not_connect() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().canonicalize().unwrap();
        let l = std::os::unix::net::UnixListener::bind(dir.join("with space.sock")).unwrap();
        l.set_nonblocking(true).unwrap();
        assert!(socket_listening(&dir.join("with space.sock")));
        assert!(!socket_listening(&dir.join("space.sock")));
        // The check made no connection.
        assert!(l.accept().is_err());
        let _d = std::os::unix::net::UnixDatagram::bind(dir.join("dgram.sock")).unwrap();
        assert!(!socket_listening(&dir.join("dgram.sock")));
        drop(l);
        assert!(!socket_listening(&dir.join("with space.sock")));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mount(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }

    #[test]
    fn cgroup_parent_dirs_on_a_v1_tree() {
        let t = tempfile::tempdir().unwrap();
        for d in ["memory", "pids", "cpu,cpuacct"] {
            fs::create_dir(t.path().join(d)).unwrap();
        }
        std::os::unix::fs::symlink("cpu,cpuacct", t.path().join("cpu")).unwrap();
        let dirs = cgroup_parent_dirs(t.path(), "berth-test/x");
        assert!(dirs.contains(&t.path().join("memory/berth-test/x")), "{dirs:?}");
        assert!(dirs.contains(&t.path().join("pids/berth-test/x")), "{dirs:?}");
        assert!(dirs.contains(&t.path().join("cpu,cpuacct/berth-test/x")), "{dirs:?}");
        assert!(!dirs.iter().any(|d| d.starts_with(t.path().join("cpu/"))), "{dirs:?}");
    }

    #[test]
    fn leak_scan_sees_state_files_and_cgroups_and_cleanup_removes_cgroups() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().canonicalize().unwrap();
        let cg = dir.join("cg");
        fs::create_dir_all(cg.join("memory/berth-test/u/berth-1")).unwrap();
        fs::create_dir_all(dir.join("state/instances/abc")).unwrap();
        fs::create_dir_all(dir.join("state/leases")).unwrap();
        fs::write(dir.join("state/leases/65536"), "").unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(dir.join("state/x.sock")).unwrap();
        let scope = LeakScope {
            dir: dir.clone(),
            state_dir: dir.join("state"),
            cgroup_root: cg.clone(),
            cgroup_parent: "berth-test/u".into(),
        };
        let l = leak_scan(&scope, &[std::process::id()]);
        let has = |s: &str| l.iter().any(|x| x.contains(s));
        assert!(has("cgroup left:") && has("berth-1"), "{l:?}");
        assert!(has("instance entry left:"), "{l:?}");
        assert!(has("lease file left:"), "{l:?}");
        assert!(has("socket left:"), "{l:?}");
        assert_eq!(l.len(), 4, "{l:?}");

        fs::remove_dir(dir.join("state/instances/abc")).unwrap();
        fs::remove_file(dir.join("state/leases/65536")).unwrap();
        fs::remove_file(dir.join("state/x.sock")).unwrap();
        cleanup(&scope);
        assert!(leak_scan(&scope, &[std::process::id()]).is_empty());
        assert!(!cg.join("memory/berth-test").exists());
    }

    #[test]
    fn leak_scan_finds_processes_naming_the_dir() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().canonicalize().unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("while :; do sleep 0.1; done")
            .arg(&dir) // $0: names the dir on the command line
            .spawn()
            .unwrap();
        let scope = LeakScope {
            dir: dir.clone(),
            state_dir: dir.join("state"),
            cgroup_root: dir.join("no-cgroups"),
            cgroup_parent: "berth-test/none".into(),
        };
        // Right after spawn() the new argv may not be visible yet: retry.
        let needle = format!("process {}", child.id());
        let mut l = Vec::new();
        for _ in 0..100 {
            l = leak_scan(&scope, &[std::process::id()]);
            if l.iter().any(|s| s.contains(&needle)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(l.iter().any(|s| s.contains(&needle)), "{l:?}");
        cleanup(&scope);
        let st = child.wait().unwrap();
        assert!(!st.success());
        assert!(leak_scan(&scope, &[std::process::id()]).is_empty());
    }
}
