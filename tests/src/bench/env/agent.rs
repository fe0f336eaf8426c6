//! [`BenchAgent`]: a `berth-agent run` of the bench, on the harness's command
//! line and log buffer, registered for undo.

use super::*;

/// The bench's agents log into the harness's buffer; see [`LogBuf`].
pub type Logs = LogBuf;

pub fn msg_is(v: &Value, m: &str) -> bool {
    v.get("message").and_then(Value::as_str) == Some(m)
}

pub fn is_instance_end(v: &Value) -> bool {
    msg_is(v, "instance ended")
}

pub fn instance_of(v: &Value) -> Option<&str> {
    v.get("instance").and_then(Value::as_str)
}

pub(crate) static AGENT_SEQ: AtomicU64 = AtomicU64::new(0);

/// A `berth-agent run` with its own temp dir, state dir, socket, id pool and
/// cgroup parent `berth-bench/<name>-<pid>-<n>`. Dropping it kills it and
/// removes everything it left.
pub struct BenchAgent {
    pub(crate) child: Mutex<Child>,
    pub pid: u32,
    /// The pid for the undo registry; 0 once reaped.
    pub(crate) live_pid: Arc<AtomicU32>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub scope: LeakScope,
    pub logs: Arc<Logs>,
    pub(crate) _undo: UndoGuard,
    pub(crate) _net: crate::netfix::SubnetClaim,
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
        let mut args = harness::run_args(&harness::RunLayout {
            socket: &socket,
            state_dir: &state_dir,
            cgroup_parent: &cgroup_parent,
            idmap: (base, count),
            daemon: &bins.fakekitd,
            shim: &bins.shim,
        });
        for a in ["--http-addr", "off", "--drain-timeout", "30s"].into_iter().chain(extra.iter().copied()) {
            args.push(a.into());
        }
        args.extend(EXTRA_AGENT_ARGS.lock().unwrap().iter().map(OsString::from));
        // A build subnet and nftables table of its own (removed on drop).
        let net = crate::netfix::SubnetClaim::new();
        args.splice(1..1, net.args());
        let mut cmd = harness::agent_command(&bins.agent, &args);
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
        logs.capture(child.stdout.take().unwrap(), format!("agent[{name}] stdout:"), verbose());
        logs.capture(child.stderr.take().unwrap(), format!("agent[{name}]:"), verbose());
        let agent = BenchAgent {
            child: Mutex::new(child),
            pid,
            live_pid,
            socket,
            state_dir,
            scope,
            logs,
            _undo: undo,
            _net: net,
        };
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
