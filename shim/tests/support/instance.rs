//! What the shim's privileged tests share: an instance dir set up by hand
//! exactly as the agent does, the real `berth-shim` started on it, and the
//! check that nothing of the instance is left. Included by each test target
//! (`#[path]`), so not every target uses every helper.
#![allow(dead_code)]

use berth_shim::cgroup::{delegate, Limits};
use berth_shim::spec::{IdRange, Outcome, PidStamp, Spec};
use nix::unistd::{chown, Gid, Uid};
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const SHIM: &str = env!("CARGO_BIN_EXE_berth-shim");
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Inst {
    pub _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub spec: Spec,
}

impl Drop for Inst {
    /// A failed test must not leave cgroups or mounts on the host.
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = Command::new(SHIM).arg("delete").arg(&self.dir).stdout(Stdio::null()).status();
        }
    }
}

/// The instance dir as the agent lays it out: dir root-owned (0711) in a
/// traversable parent, root/ run/ home/ owned by the instance's root, a
/// real cgroup with limits, a lease file, spec.json.
pub fn setup(daemon: &str, args: &[&str]) -> Inst {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    assert!(n < 16);
    let pid = std::process::id();
    let host_base = 3_000_000_000 + ((pid % 64) * 16 + n) * 65536;
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join(format!("inst-{n}"));
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).unwrap();
    for sub in ["root", "run", "home"] {
        let p = dir.join(sub);
        fs::create_dir(&p).unwrap();
        chown(&p, Some(Uid::from_raw(host_base)), Some(Gid::from_raw(host_base))).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();
    }
    let (layout, _) = delegate::plan(Path::new("/sys/fs/cgroup"), Path::new("/proc"), Some("berth-shimtest"))
        .and_then(|p| p.apply())
        .expect("host cgroups usable (run as root)");
    let limits = Limits { memory_bytes: 256 << 20, cpu_millis: 1000, pids: 64 };
    let cgroup = layout.create(&format!("t{pid}-{n}"), &limits).unwrap();
    let lease = tmp.path().join(format!("lease-{n}"));
    fs::write(&lease, "lease").unwrap();
    let spec = Spec {
        id: format!("shimtest-{pid}-{n}"),
        dir: dir.clone(),
        ids: IdRange { host_base, count: 65536 },
        daemon: daemon.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into())],
        cgroup,
        stop_grace_ms: 300,
        lease,
        hostname: "berth-test".into(),
        client: "test".into(),
        client_key: "test".into(),
        owner: "test".into(),
        isolate_network: false,
        network: None,
        log_cap_bytes: 16 << 20,
        disk: None,
        listen_fd: false,
        hold: false,
        hold_fd_args: vec![],
    };
    spec.store().unwrap();
    Inst { _tmp: tmp, dir, spec }
}

pub fn spawn(inst: &Inst) -> Child {
    Command::new(SHIM).arg("run").arg(&inst.dir).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap()
}

/// The shim's single stdout line and its exit status, bounded by WAIT.
pub fn outcome(mut child: Child) -> (Outcome, ExitStatus) {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let lines: Vec<String> = BufReader::new(stdout).lines().map_while(Result::ok).collect();
        let _ = tx.send(lines);
    });
    let lines = rx.recv_timeout(WAIT).expect("shim printed its outcome in time");
    assert_eq!(lines.len(), 1, "exactly one line: {lines:?}");
    let out: Outcome = serde_json::from_str(&lines[0]).unwrap();
    (out, child.wait().unwrap())
}

pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(10));
    }
}

pub fn read_when_there(p: &Path) -> String {
    wait_for(&p.display().to_string(), || p.exists());
    fs::read_to_string(p).unwrap()
}

pub fn cmdlines_with(needle: &str) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

pub fn assert_gone(inst: &Inst) {
    assert!(!inst.dir.exists(), "instance dir left");
    for (c, d) in &inst.spec.cgroup.dirs {
        assert!(!d.exists(), "{c} cgroup left: {}", d.display());
    }
    assert!(!inst.spec.lease.exists(), "lease left");
    let procs = cmdlines_with(&inst.dir.to_string_lossy());
    assert!(procs.is_empty(), "processes left: {procs:?}");
}

pub fn running(stamp: &PidStamp) -> bool {
    let stat = fs::read_to_string(format!("/proc/{}/stat", stamp.pid)).unwrap_or_default();
    stamp.alive(Path::new("/proc")) && !stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

/// SIGTERM to the shim, then its outcome.
pub fn stop_shim(child: Child) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let (out, _) = outcome(child);
    assert!(out.leftovers.is_empty(), "{out:?}");
}
