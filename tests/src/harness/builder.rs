//! [`AgentBuilder`]: the command line of a test agent in its own temp dir,
//! with a unique cgroup parent and a random id-map range.

use super::*;

pub(crate) static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A random multiple of 65536 in [2^24, 2^31) such that `base + count <= 2^31`.
pub fn random_idmap_base(count: u32) -> u32 {
    let lo = (1u64 << 24) / 65536;
    let hi = ((1u64 << 31) - count as u64) / 65536; // exclusive upper slot
    let slot = lo + berth_shim::host::random_u64() % (hi - lo);
    (slot * 65536) as u32
}

pub(crate) fn sanitize(name: &str) -> String {
    let s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    s.chars().take(40).collect()
}

/// Where an agent of the harness or the bench keeps its things.
pub struct RunLayout<'a> {
    pub socket: &'a Path,
    pub state_dir: &'a Path,
    pub cgroup_parent: &'a str,
    /// `(--idmap-base, --idmap-count)`.
    pub idmap: (u32, u32),
    pub daemon: &'a Path,
    pub shim: &'a Path,
}

/// The `berth-agent run` flags every agent of the harness and the bench
/// starts with; callers append their own after these.
pub fn run_args(l: &RunLayout) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["run".into()];
    let mut push = |k: &str, v: &OsStr| {
        args.push(k.into());
        args.push(v.to_owned());
    };
    push("--listen", OsStr::new(&format!("unix://{}", l.socket.display())));
    push("--state-dir", l.state_dir.as_os_str());
    push("--cgroup-parent", OsStr::new(l.cgroup_parent));
    push("--idmap-base", OsStr::new(&l.idmap.0.to_string()));
    push("--idmap-count", OsStr::new(&l.idmap.1.to_string()));
    push("--daemon", l.daemon.as_os_str());
    push("--shim", l.shim.as_os_str());
    push("--log-format", OsStr::new("json"));
    // Tests and benches share this machine's disk with other suites: the
    // default reserve (10% of the filesystem free) would make them depend on
    // how full it is. Tests of the reserve set their own.
    push("--reserve-disk", OsStr::new("0"));
    args
}

/// A `berth-agent` command that inherits no `BERTH_*` setting from the
/// test's environment (the agent reads its flags from there too), with
/// stdin closed and stdout and stderr piped for a [`LogBuf`].
pub fn agent_command(exe: &Path, args: &[OsString]) -> Command {
    let mut cmd = Command::new(exe);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BERTH_") {
            cmd.env_remove(&k);
        }
    }
    // Under emulation (the v2 lane) an instance takes ~30 s to answer: the
    // agent's own start timeout stretches with the harness's waits. A test's
    // own --start-timeout or env still wins.
    if super::logs::time_scale() > 1 {
        cmd.env("BERTH_START_TIMEOUT", format!("{}s", 30 * super::logs::time_scale()));
    }
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Builds an [`Agent`]; see [`Agent::builder`].
pub struct AgentBuilder {
    pub(crate) name: String,
    pub(crate) extra: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) daemon: Option<PathBuf>,
    pub(crate) shim: Option<PathBuf>,
    pub(crate) idmap: Option<(u32, u32)>,
    pub(crate) cgroup_root: PathBuf,
    pub(crate) dir_args: Vec<(String, String)>,
    pub(crate) wrapper: Vec<OsString>,
    pub(crate) netns: Option<String>,
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

    /// Runs the agent in the named network namespace (`/run/netns/<ns>`,
    /// through `nsenter --net`, which leaves the mounts alone).
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
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

        let mut args = run_args(&RunLayout {
            socket: &socket,
            state_dir: &state_dir,
            cgroup_parent: &cgroup_parent,
            idmap: (idmap_base, idmap_count),
            daemon: &daemon,
            shim: &shim,
        });
        // A build subnet and nftables table of this agent's own (see netfix).
        let claim = crate::netfix::SubnetClaim::new();
        args.extend(claim.args());
        if self.cgroup_root != Path::new("/sys/fs/cgroup") {
            args.push("--cgroup-root".into());
            args.push(self.cgroup_root.clone().into());
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
            wrapper: self.wrapper,
            args,
            env: self.env,
            dir,
            socket,
            state_dir,
            cgroup_parent,
            cgroup_root: self.cgroup_root,
            idmap_base,
            idmap_count,
            claim,
            netns: self.netns,
            logs: LogBuf::new(),
            proc: Mutex::new(None),
            _tmp: tmp,
        };
        agent.spawn_process();
        agent
    }

    /// Runs the agent under a wrapper command, e.g. `unshare --pid --fork
    /// --kill-child --mount-proc` (a pid namespace of its own). A wrapper
    /// that forks must end the agent when it is killed (`--kill-child`);
    /// signals go to the wrapper's child, the agent itself.
    pub fn wrapper<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.wrapper = argv.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self
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
