//! [`Agent`]: a running `berth-agent run`, its logs, restarts, waits and
//! the cleanup on drop.

use super::*;

pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) status: Option<ExitStatus>,
    /// The threads reading its stdout and stderr.
    pub(crate) readers: Vec<std::thread::JoinHandle<()>>,
}

/// A running `berth-agent run` in its own temp environment. Dropping it
/// SIGKILLs the agent and cleans up (best effort) what it left: processes,
/// mounts and cgroups of its test parent.
pub struct Agent {
    pub(crate) exe: PathBuf,
    /// A command the agent runs under (see [`AgentBuilder::wrapper`]).
    pub(crate) wrapper: Vec<OsString>,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) dir: PathBuf,
    pub(crate) socket: PathBuf,
    pub(crate) state_dir: PathBuf,
    pub(crate) cgroup_parent: String,
    pub(crate) cgroup_root: PathBuf,
    pub(crate) idmap_base: u32,
    pub(crate) idmap_count: u32,
    pub(crate) claim: crate::netfix::SubnetClaim,
    pub(crate) netns: Option<String>,
    pub(crate) logs: Arc<LogBuf>,
    pub(crate) proc: Mutex<Option<Proc>>,
    pub(crate) _tmp: TempDir,
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
            wrapper: Vec::new(),
            netns: None,
        }
    }

    /// `Agent::builder(name).start()`.
    pub fn start(name: &str) -> Agent {
        Agent::builder(name).start()
    }

    /// The agent's command line, environment and pipes.
    pub(crate) fn command(&self) -> Command {
        // The HTTP endpoint (default 0.0.0.0:9411, which parallel agents
        // would fight over) takes an ephemeral loopback port; see `http_addr`.
        // A wrapper (e.g. unshare) runs the agent; a network namespace is
        // entered first, by nsenter, around the wrapper.
        let mut prefix: Vec<OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            prefix.push("nsenter".into());
            prefix.push(format!("--net=/run/netns/{ns}").into());
        }
        prefix.extend(self.wrapper.iter().cloned());
        let mut cmd = match prefix.split_first() {
            Some((prog, rest)) => {
                let mut argv = rest.to_vec();
                argv.push(self.exe.clone().into());
                argv.extend(self.args.iter().cloned());
                agent_command(Path::new(prog), &argv)
            }
            None => agent_command(&self.exe, &self.args),
        };
        cmd.env("BERTH_HTTP_ADDR", "127.0.0.1:0").envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    pub(crate) fn spawn_process(&self) {
        let mut cmd = self.command();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", self.exe.display()));
        let pid = child.id();
        eprintln!("harness: started agent pid {pid}: {cmd:?}");
        let readers = vec![
            self.logs.capture(child.stdout.take().unwrap(), format!("agent[{pid}] stdout:"), true),
            self.logs.capture(child.stderr.take().unwrap(), format!("agent[{pid}]:"), true),
        ];
        *self.proc.lock().unwrap() = Some(Proc { child, status: None, readers });
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
                // A test that reads the log once the exit is seen must
                // find the last lines.
                super::logs::drain(&p.readers);
                p.status = Some(st);
            }
        }
        p.status.is_none().then(|| p.child.id())
    }

    /// The agent process itself: the wrapper's child when it has one.
    pub fn agent_pid(&self) -> Option<u32> {
        let pid = self.pid()?;
        if self.wrapper.is_empty() {
            return Some(pid);
        }
        // A wrapper that execs the agent (no fork) is the agent itself.
        let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        children.split_whitespace().next().and_then(|c| c.parse().ok()).or(Some(pid))
    }

    pub(crate) fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.agent_pid() {
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
                // A test that reads the log once the exit is seen must
                // find the last lines.
                super::logs::drain(&p.readers);
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

    pub(crate) fn ready_now(&self) -> Result<bool, String> {
        if let Some(st) = self.try_exit_status() {
            return Err(format!(
                "berth-agent exited with {st} before its socket {} accepted connections; output:\n{}",
                self.socket.display(),
                self.log_tail(40)
            ));
        }
        // /proc/net/unix lists the reader's network namespace: an agent in
        // a namespace of its own is seen through its own /proc entry.
        match (&self.netns, self.pid()) {
            (Some(_), Some(pid)) => Ok(socket_listening_in(&format!("/proc/{pid}/net/unix"), &self.socket)),
            _ => Ok(socket_listening(&self.socket)),
        }
    }

    /// `timeout` is the unscaled wait; the message says how long it really was.
    pub(crate) fn not_ready(&self, timeout: Duration) -> String {
        format!(
            "berth-agent (pid {:?}) socket {} did not accept connections within {:?} ({timeout:?} x time scale {}); output:\n{}",
            self.pid(),
            self.socket.display(),
            super::logs::scaled(timeout),
            super::logs::time_scale(),
            self.log_tail(40)
        )
    }

    /// Waits until the socket is listening (see [`socket_listening`]: no
    /// connection is made); an error (with the agent's
    /// last output) if the agent exits first or `timeout` passes.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + super::logs::scaled(timeout);
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
        let deadline = Instant::now() + super::logs::scaled(timeout);
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

    pub(crate) fn kill_and_reap(&self) {
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
        self.logs.values(0)
    }
    /// The raw captured lines.
    pub fn log_lines(&self) -> Vec<String> {
        self.logs.raw_lines(0)
    }
    /// The last `n` raw lines, newline-joined (for panic messages).
    pub fn log_tail(&self, n: usize) -> String {
        self.logs.tail(n)
    }
    /// The number of lines so far: a mark for [`wait_log_since`](Self::wait_log_since).
    pub fn log_mark(&self) -> usize {
        self.logs.mark()
    }
    /// The first line (from the start) matching `pred`, waiting up to `timeout` for it.
    pub fn wait_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        self.logs.wait_blocking(0, &pred, timeout)
    }
    /// Like [`wait_log`](Self::wait_log), looking only at lines from `mark` on.
    pub fn wait_log_since(&self, mark: usize, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        self.logs.wait_blocking(mark, &pred, timeout)
    }
    /// [`wait_log_since`](Self::wait_log_since) without blocking the async runtime.
    pub async fn wait_log_async(&self, mark: usize, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + super::logs::scaled(timeout);
        loop {
            if let Some((_, v)) = self.logs.find_from(mark, &pred) {
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
        let deadline = Instant::now() + super::logs::scaled(timeout);
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

    /// One sample of /metrics by its full name with labels (`berth_slots`,
    /// `berth_warm_claims_total{stage="sandbox"}`); panics, with the page,
    /// when it is not there. Needs `--http-addr 127.0.0.1:0`.
    pub fn metric(&self, name: &str) -> f64 {
        use std::io::{Read, Write};
        let addr = self.http_addr(Duration::from_secs(30)).expect("the agent's http address");
        let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request /metrics");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read /metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
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
        let mut out = leak_scan(&self.scope(), &exclude);
        out.extend(crate::netfix::leak_scan(&self.state_dir, self.netns.as_deref(), &self.claim));
        out
    }

    /// The agent's build subnet and nftables table (unique per test agent).
    pub fn net(&self) -> &crate::netfix::SubnetClaim {
        &self.claim
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
    socket_listening_in("/proc/net/unix", path)
}

/// [`socket_listening`] reading the given `/proc/.../net/unix`.
pub fn socket_listening_in(proc_net_unix: &str, path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let Ok(text) = fs::read_to_string(proc_net_unix) else {
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
        crate::netfix::drop_table(self.netns.as_deref(), &self.claim.table);
    }
}
