//! The files an instance dir holds, shared by the agent (writer of the spec,
//! reader of the result) and the shim (reader of the spec, writer of the rest).
//!
//! Layout of `<state-dir>/instances/<id>/` (owned by host root, mode 0711):
//! - `spec.json`   what to run and where; written by the agent before the shim starts
//! - `shim.pid`    `<pid> <starttime>` of the shim, written by the shim at start
//! - `daemon.pid`  `<pid> <starttime>` of the daemon (host pid), written by the shim
//! - `daemon.log`  the daemon's stdout and stderr, copied by the shim from a pipe up to
//!   `log_cap_bytes`, then one note line saying how much was dropped (root-owned, 0600)
//! - `root/`       the daemon's `--root`, owned by the instance's root (mode 0700)
//! - `run/`        socket dir and `XDG_RUNTIME_DIR`, owned by the instance's root (0700)
//! - `home/`       `HOME`, owned by the instance's root (0700)
//! - `disk.img`    with a disk limit: the sparse ext4 image mounted on `root/`
//!   (root-owned, 0600), and `disk.loop`, the loop device it was bound to
//!
//! Everything needed to clean an instance up is in these files, so that
//! `berth-shim delete <dir>` works after both agent and shim are gone.

use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub const SPEC_FILE: &str = "spec.json";
pub const SHIM_PID_FILE: &str = "shim.pid";
pub const DAEMON_PID_FILE: &str = "daemon.pid";
pub const DAEMON_LOG_FILE: &str = "daemon.log";
pub const ROOT_DIR: &str = "root";
pub const RUN_DIR: &str = "run";
pub const HOME_DIR: &str = "home";
/// Name of the daemon's socket inside `run/`.
pub const SOCKET_NAME: &str = "buildkitd.sock";
/// The instance's own `/etc/resolv.conf` and `/etc/hosts` (isolated network),
/// bind-mounted over the host's in the daemon's mount namespace.
pub const RESOLV_FILE: &str = "resolv.conf";
pub const HOSTS_FILE: &str = "hosts";
/// Ids mapped per instance: a full range, as buildkit's devpts `gid=5` and
/// image layers with arbitrary owners need.
pub const IDS_PER_INSTANCE: u32 = 65536;
/// `Spec::log_cap_bytes` of a spec that does not name one.
pub const DEFAULT_LOG_CAP: u64 = 16 << 20;

fn default_log_cap() -> u64 {
    DEFAULT_LOG_CAP
}

/// A contiguous host id range mapped to 0..count inside the user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub host_base: u32,
    pub count: u32,
}

impl IdRange {
    /// The line for `/proc/<pid>/uid_map` and `gid_map`.
    pub fn map_line(&self) -> String {
        format!("0 {} {}\n", self.host_base, self.count)
    }
    pub fn overlaps(&self, other: &IdRange) -> bool {
        let (a0, a1) = (self.host_base as u64, self.host_base as u64 + self.count as u64);
        let (b0, b1) = (other.host_base as u64, other.host_base as u64 + other.count as u64);
        a0 < b1 && b0 < a1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    V1,
    V2,
}

/// The instance's cgroup: one dir on v2, one dir per controller on v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupSpec {
    pub version: CgroupVersion,
    /// `(controller, dir)`; on v2 a single entry with controller `"unified"`.
    pub dirs: Vec<(String, PathBuf)>,
}

impl CgroupSpec {
    pub fn dir_of(&self, controller: &str) -> Option<&Path> {
        match self.version {
            CgroupVersion::V2 => self.dirs.first().map(|(_, d)| d.as_path()),
            CgroupVersion::V1 => self.dirs.iter().find(|(c, _)| c == controller).map(|(_, d)| d.as_path()),
        }
    }
}

/// What the agent asks the shim to run. Written once, never modified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub id: String,
    /// The instance dir this spec lives in (absolute).
    pub dir: PathBuf,
    pub ids: IdRange,
    /// Path of the daemon binary, as seen by the shim.
    pub daemon: PathBuf,
    /// Full argv after argv[0], including `--addr` and `--root`.
    pub args: Vec<String>,
    /// The daemon's whole environment (nothing is inherited from the agent).
    pub env: Vec<(String, String)>,
    pub cgroup: CgroupSpec,
    /// Grace between SIGTERM and SIGKILL of the daemon, in milliseconds.
    pub stop_grace_ms: u64,
    /// The id-range lease file the shim removes as its last step.
    pub lease: PathBuf,
    /// Hostname inside the instance's uts namespace.
    pub hostname: String,
    /// Free text naming the client (peer uid/pid or pod), for logs only.
    pub client: String,
    /// What the agent keys the instance by (peer identity or pod), so that
    /// another agent on the node can find a client's instance from files.
    #[serde(default)]
    pub client_key: String,
    /// Give the daemon its own network namespace with only loopback (up):
    /// offline builds that cannot reach the node's network. Off, builds use
    /// the node's network, as rootless buildkit does by default.
    #[serde(default)]
    pub isolate_network: bool,
    /// Id of the agent that owns the instance; its lock file
    /// `<state>/agents/<owner>.lock` is held while that agent lives, so a
    /// sweep never touches a live agent's instances.
    #[serde(default)]
    pub owner: String,
    /// Most bytes of the daemon's output kept in daemon.log; the rest is
    /// counted and dropped (its last bytes still reach `Outcome.stderr_tail`).
    #[serde(default = "default_log_cap")]
    pub log_cap_bytes: u64,
    /// The instance's disk (image, mount point, limit); None: unlimited,
    /// `root/` is a plain dir on the state dir's filesystem.
    #[serde(default)]
    pub disk: Option<crate::disk::DiskSpec>,
    /// The isolated network (`--build-network isolated`): a veth pair from
    /// the agent's network namespace into the daemon's. Implies
    /// `isolate_network`. Everything here is what `net::release` undoes.
    #[serde(default)]
    pub network: Option<NetSpec>,
    /// fd-passed (issue 15): the agent hands the pod's listening socket to
    /// `berth-shim run` as its fd 3 ([`LISTEN_FD`]), and the daemon gets it
    /// as fd 3 with `LISTEN_FDS=1 LISTEN_PID=1` (socket activation, pid 1 of
    /// its pid namespace) and serves it as `--addr fd://`. The pod's socket
    /// file is the agent's (it stays bound), so nothing of it is the
    /// instance's to remove: `delete` and the sweep treat the instance like
    /// any other, and a restarted agent sweeps it (the daemon's copy of the
    /// old listener no longer has a path once the agent binds a new one).
    #[serde(default)]
    pub listen_fd: bool,
    /// A sandbox of the warm pool (`--warm-stage sandbox`): the shim makes
    /// everything up to the daemon's exec (namespaces, maps, cgroup,
    /// network), prints [`HELD_LINE`] on its stdout and holds the child
    /// before exec until the agent writes [`GO_BYTE`] on its lifeline.
    #[serde(default)]
    pub hold: bool,
    /// With `hold`: the daemon's extra arguments when the go hands it a
    /// listener (a pod's socket claimed the sandbox), which it then gets as
    /// fd 3 with `LISTEN_FDS=1`, as with `listen_fd` (for buildkitd:
    /// `--addr fd://`). Without a listener the daemon runs with `args`.
    #[serde(default)]
    pub hold_fd_args: Vec<String>,
}

/// The line a holding shim prints on its stdout (before its outcome line):
/// the sandbox is made and the child waits before exec.
pub const HELD_LINE: &str = "held";
/// The byte the agent writes on a holding shim's lifeline (stdin, a unix
/// socket then): exec the daemon now. It may carry one descriptor
/// (SCM_RIGHTS), a pod's listener for the daemon (see `hold_fd_args`).
pub const GO_BYTE: u8 = b'g';

/// The descriptor number of the pod's listener, in the shim and in the
/// daemon (`SD_LISTEN_FDS_START`).
pub const LISTEN_FD: i32 = 3;

/// One instance's share of the isolated network: a /30 of the build subnet,
/// the host side of the veth pair and the lease that reserves the subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// Host-side veth in the agent's network namespace (`bk<tag><id>`).
    pub host_if: String,
    pub host_addr: std::net::Ipv4Addr,
    /// The daemon's address on its `eth0`; its default route goes to `host_addr`.
    pub inner_addr: std::net::Ipv4Addr,
    pub prefix_len: u8,
    /// The subnet lease file, removed when the veth is gone.
    pub lease: PathBuf,
    /// berth's nftables table holding this instance's element
    /// `inner_addr . host_if` in its `builds` set (empty: none, a spec
    /// written before the element existed).
    #[serde(default)]
    pub nft_table: String,
}

/// The daemon's socket inside an instance dir; the agent dials it, the
/// shim probes it, the tests look for it.
pub fn socket_path(instance_dir: &Path) -> PathBuf {
    instance_dir.join(RUN_DIR).join(SOCKET_NAME)
}

impl Spec {
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join(ROOT_DIR)
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join(RUN_DIR)
    }
    pub fn home_dir(&self) -> PathBuf {
        self.dir.join(HOME_DIR)
    }
    pub fn socket(&self) -> PathBuf {
        socket_path(&self.dir)
    }
    pub fn load(dir: &Path) -> Result<Spec, SpecError> {
        let path = dir.join(SPEC_FILE);
        let raw = fs::read(&path).map_err(|source| SpecError::Io { path: path.clone(), source })?;
        serde_json::from_slice(&raw).map_err(|source| SpecError::Parse { path, source })
    }
    /// Writes the spec atomically (temp file + rename), so a crash never leaves
    /// a half-written spec for the sweep to choke on.
    pub fn store(&self) -> Result<(), SpecError> {
        let path = self.dir.join(SPEC_FILE);
        let tmp = self.dir.join(".spec.json.tmp");
        let raw = serde_json::to_vec_pretty(self).expect("spec serializes");
        fs::write(&tmp, raw).map_err(|source| SpecError::Io { path: tmp.clone(), source })?;
        fs::rename(&tmp, &path).map_err(|source| SpecError::Io { path, source })
    }
}

/// Why an instance ended, as the shim saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The shim was asked to stop (SIGTERM/SIGINT from the agent).
    Stopped,
    /// The daemon exited on its own (crash, OOM kill, or a clean exit).
    DaemonExited,
    /// The agent went away (lifeline pipe closed).
    ParentGone,
    /// The shim could not start the daemon at all.
    StartFailed,
    /// `berth-shim delete` cleaned it from files.
    Deleted,
}

/// The shim's last word, one JSON line on its stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub id: String,
    pub reason: EndReason,
    /// Exit code of the daemon, when it exited normally.
    pub exit_code: Option<i32>,
    /// Signal that killed the daemon, when one did.
    pub signal: Option<i32>,
    /// Peak memory of the instance's cgroup in bytes, when the controller reports it.
    pub peak_memory: Option<u64>,
    /// OOM kills inside the instance's cgroup.
    pub oom_kills: u64,
    /// Times a fork hit the pids limit.
    pub pids_limit_hits: u64,
    /// Last bytes of the daemon's stderr.
    pub stderr_tail: String,
    /// Milliseconds from shim start to the end of the wipe.
    pub duration_ms: u64,
    /// The instance filesystem's usage at the end (statfs), with a disk limit.
    #[serde(default)]
    pub disk: Option<crate::disk::Usage>,
    /// Anything that could not be removed, with its path and the error.
    pub leftovers: Vec<String>,
    /// Set when the shim itself failed (start error), with the cause.
    pub error: Option<String>,
}

impl Outcome {
    pub fn new(id: &str, reason: EndReason) -> Outcome {
        Outcome {
            id: id.to_string(),
            reason,
            exit_code: None,
            signal: None,
            peak_memory: None,
            oom_kills: 0,
            pids_limit_hits: 0,
            stderr_tail: String::new(),
            duration_ms: 0,
            disk: None,
            leftovers: Vec::new(),
            error: None,
        }
    }
}

/// A pid plus its start time (field 22 of `/proc/<pid>/stat`), so that a
/// recycled pid is never mistaken for ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidStamp {
    pub pid: i32,
    pub starttime: u64,
}

impl PidStamp {
    pub fn of(proc_root: &Path, pid: i32) -> io::Result<PidStamp> {
        Ok(PidStamp { pid, starttime: starttime(proc_root, pid)? })
    }
    pub fn parse(s: &str) -> Option<PidStamp> {
        let mut it = s.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let starttime = it.next()?.parse().ok()?;
        Some(PidStamp { pid, starttime })
    }
    pub fn render(&self) -> String {
        format!("{} {}\n", self.pid, self.starttime)
    }
    /// True while the very same process (not a recycled pid) still exists.
    pub fn alive(&self, proc_root: &Path) -> bool {
        starttime(proc_root, self.pid).map(|t| t == self.starttime).unwrap_or(false)
    }
    pub fn load(path: &Path) -> Option<PidStamp> {
        fs::read_to_string(path).ok().and_then(|s| PidStamp::parse(&s))
    }
}

/// Reads the start time of a process from `<proc>/<pid>/stat`.
pub fn starttime(proc_root: &Path, pid: i32) -> io::Result<u64> {
    let stat = fs::read_to_string(proc_root.join(pid.to_string()).join("stat"))?;
    // comm may contain spaces and parens: fields restart after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no ')' in stat"))?;
    // rest starts at field 3 (state); starttime is field 22.
    rest.split_whitespace()
        .nth(22 - 3)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short stat"))
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a valid instance spec: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_overlap_only_when_they_share_an_id() {
        let a = IdRange { host_base: 100_000, count: 65536 };
        let b = IdRange { host_base: 165_536, count: 65536 };
        let c = IdRange { host_base: 165_535, count: 2 };
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&c) && b.overlaps(&c));
        assert_eq!(a.map_line(), "0 100000 65536\n");
    }

    #[test]
    fn pid_stamp_round_trips_and_detects_self() {
        let me = std::process::id() as i32;
        let s = PidStamp::of(Path::new("/proc"), me).unwrap();
        assert_eq!(PidStamp::parse(&s.render()), Some(s));
        assert!(s.alive(Path::new("/proc")));
        let other = PidStamp { pid: me, starttime: s.starttime + 1 };
        assert!(!other.alive(Path::new("/proc")));
    }

    #[test]
    fn spec_store_is_loadable() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            id: "abc".into(),
            dir: dir.path().to_path_buf(),
            ids: IdRange { host_base: 1 << 20, count: IDS_PER_INSTANCE },
            daemon: "/bin/true".into(),
            args: vec!["--addr".into(), "unix:///x".into()],
            env: vec![("USER".into(), "berth".into())],
            cgroup: CgroupSpec {
                version: CgroupVersion::V2,
                dirs: vec![("unified".into(), "/sys/fs/cgroup/x".into())],
            },
            stop_grace_ms: 2000,
            lease: dir.path().join("lease"),
            hostname: "berth-abc".into(),
            client: "uid=0".into(),
            client_key: "uid=0 gid=0".into(),
            owner: "agent-1".into(),
            isolate_network: false,
            log_cap_bytes: 1 << 20,
            listen_fd: true,
            hold: true,
            hold_fd_args: vec!["--addr".into(), "fd://".into()],
            disk: Some(crate::disk::DiskSpec::new(dir.path(), dir.path().join("root"), 64 << 20)),
            network: Some(NetSpec {
                host_if: "bk0000abcdef012".into(),
                host_addr: "10.213.0.1".parse().unwrap(),
                inner_addr: "10.213.0.2".parse().unwrap(),
                prefix_len: 30,
                lease: dir.path().join("net-lease"),
                nft_table: "berth".into(),
            }),
        };
        spec.store().unwrap();
        assert_eq!(Spec::load(dir.path()).unwrap(), spec);
        assert_eq!(spec.cgroup.dir_of("memory"), Some(Path::new("/sys/fs/cgroup/x")));

        // A spec from before the cap existed loads with the default one.
        let mut old: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(SPEC_FILE)).unwrap()).unwrap();
        assert!(old.as_object_mut().unwrap().remove("log_cap_bytes").is_some());
        assert!(old.as_object_mut().unwrap().remove("disk").is_some());
        assert!(old.as_object_mut().unwrap().remove("listen_fd").is_some());
        assert!(old.as_object_mut().unwrap().remove("hold").is_some());
        assert!(old.as_object_mut().unwrap().remove("hold_fd_args").is_some());
        fs::write(dir.path().join(SPEC_FILE), old.to_string()).unwrap();
        let loaded = Spec::load(dir.path()).unwrap();
        assert_eq!(loaded.log_cap_bytes, 16 << 20);
        assert_eq!(
            loaded,
            Spec {
                log_cap_bytes: DEFAULT_LOG_CAP,
                disk: None,
                listen_fd: false,
                hold: false,
                hold_fd_args: vec![],
                ..spec
            }
        );
    }
}
