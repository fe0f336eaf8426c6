//! Core end-to-end suite (issue 2): the real `berth-agent`, `berth-shim`,
//! `fakekitd` and `fakeclient` over real sockets, as root, with real
//! namespaces and cgroups (v1 on this machine; v2 in the VM lane, where each
//! test asserts the v2 files instead). Every test runs its own [`Agent`] (its
//! own temp dir, state dir, cgroup parent and id pool), so the tests run in
//! parallel. Every fixed wait, idle timeout and client timeout here goes
//! through the harness's time scale (`scaled`): the VM lane runs these under
//! software emulation, several times slower.
//!
//! Build the binaries first: `cargo build --workspace --bins`.

use berth_tests::grpc::fake_client;
use berth_tests::harness::{
    self, fakeclient, is_instance_end, run_json, scaled, scaled_flag, scaled_secs, Agent, AgentBuilder, ClientRun,
    LeakScope,
};
use berth_tests::proto::fake::{ForkRequest, PingReply, PingRequest, SymlinkRequest, WriteFilesRequest};
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on one gRPC call through the agent (spawn + ready + call), before
/// the time scale.
const CALL: Duration = Duration::from_secs(20);
/// Bound on waiting for an instance's end line.
const END: Duration = Duration::from_secs(15);
/// Bound on waiting for the leak scan to come back empty.
const CLEAN: Duration = Duration::from_secs(15);

/// An agent builder with the settings every test here wants: explicit slots,
/// a short stop grace, and (for the uid tests) a socket other uids can use.
/// `idle` is stretched by the time scale: a client's next call must find its
/// instance still there however slow the machine.
fn agent(name: &str, max_builds: u32, idle: &str) -> AgentBuilder {
    Agent::builder(name)
        .arg("--max-builds")
        .arg(max_builds.to_string())
        .arg("--idle-timeout")
        .arg(scaled_flag(idle))
        .arg("--stop-grace")
        .arg(scaled_flag("500ms"))
        .arg("--socket-mode")
        .arg("0666")
}

/// Fake.Ping on a fresh connection to `socket`.
async fn try_ping(socket: &Path) -> Result<PingReply, tonic::Status> {
    let mut c = fake_client(socket).await;
    match tokio::time::timeout(scaled(CALL), c.ping(PingRequest {})).await {
        Ok(r) => r.map(|r| r.into_inner()),
        Err(_) => panic!("Ping through {} did not return within {:?}", socket.display(), scaled(CALL)),
    }
}

async fn ping(agent: &Agent) -> PingReply {
    match try_ping(agent.socket()).await {
        Ok(r) => r,
        Err(e) => panic!("Ping failed: {e:?}\nagent output:\n{}", agent.log_tail(40)),
    }
}

/// The instance id from the daemon's `--root` (`<state>/instances/<id>/root`).
fn instance_id_of_root(agent: &Agent, root: &str) -> String {
    let root = Path::new(root);
    let inst = root.parent().unwrap_or_else(|| panic!("root {root:?} has no parent"));
    assert_eq!(
        inst.parent(),
        Some(agent.state_dir().join("instances").as_path()),
        "root {root:?} is not <state>/instances/<id>/root"
    );
    assert_eq!(root.file_name().and_then(|s| s.to_str()), Some("root"), "{root:?}");
    inst.file_name().unwrap().to_string_lossy().into_owned()
}

/// A fakeclient run as `uid`/`gid` = `uid` (another client for the agent),
/// with a client timeout.
fn fc(agent: &Agent, uid: u32, args: &[&str]) -> Command {
    let mut c = fakeclient(agent.socket());
    c.uid(uid).gid(uid).arg("--timeout").arg(scaled_secs(30)).args(args);
    c
}

async fn run_fc(cmd: Command) -> ClientRun {
    tokio::task::spawn_blocking(move || run_json(cmd)).await.unwrap()
}

async fn fc_ok(agent: &Agent, uid: u32, args: &[&str]) -> Value {
    let r = run_fc(fc(agent, uid, args)).await;
    assert!(r.ok(), "fakeclient (uid {uid}) {args:?} failed: {r:?}\nagent output:\n{}", agent.log_tail(40));
    r.json
}

/// `(inside, host base, count)` of a one-line `/proc/<pid>/uid_map`.
fn parse_map(map: &str) -> Vec<(u64, u64, u64)> {
    map.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            assert_eq!(f.len(), 3, "bad map line {l:?}");
            (f[0], f[1], f[2])
        })
        .collect()
}

/// The one host range of a map that must be exactly `0 <base> 65536`.
fn single_range(map: &str) -> (u64, u64) {
    let m = parse_map(map);
    assert_eq!(m.len(), 1, "map is not one line: {map:?}");
    let (inside, base, count) = m[0];
    assert_eq!((inside, count), (0, 65536), "map {map:?}");
    (base, base + count)
}

/// The end line of instance `id` (waits up to [`END`]).
async fn end_line(agent: &Agent, id: &str) -> Value {
    let id2 = id.to_string();
    match agent.wait_log_async(0, move |v| is_instance_end(v) && v["instance"] == id2.as_str(), END).await {
        Some(v) => v,
        None => panic!("no \"instance ended\" line for {id} within {END:?}; agent output:\n{}", agent.log_tail(60)),
    }
}

async fn assert_clean(agent: &Agent, what: &str) {
    let leaks = agent.wait_clean_async(CLEAN).await;
    assert!(
        leaks.is_empty(),
        "{what}: leftovers after {CLEAN:?}:\n  {}\nagent output:\n{}",
        leaks.join("\n  "),
        agent.log_tail(60)
    );
}

/// Whether this host runs cgroup v2 only (the VM lane), where the tests
/// assert the unified hierarchy's files instead of v1's.
fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// Host dirs of the instance's cgroups, from the daemon's own `/proc/self/cgroup`
/// (the instance shares the host's cgroup namespace): on v1 every line of a
/// controller hierarchy naming `berth-<id>`, on v2 the one unified line
/// (`0::/<parent>/berth-<id>`).
fn instance_cgroup_dirs(cgroup: &str, id: &str) -> Vec<PathBuf> {
    let leaf = format!("berth-{id}");
    let v2 = cgroup_v2();
    berth_shim::cgroup::parse_proc(cgroup)
        .into_iter()
        .filter(|e| e.path.split('/').any(|c| c == leaf) && e.controllers.is_empty() == v2)
        .map(|e| {
            let rel = e.path.trim_start_matches('/');
            if v2 {
                Path::new("/sys/fs/cgroup").join(rel)
            } else {
                Path::new("/sys/fs/cgroup").join(e.controllers.trim_start_matches("name=")).join(rel)
            }
        })
        .collect()
}

fn proc_argv(pid: u32) -> Option<String> {
    fs::read(format!("/proc/{pid}/cmdline")).ok().map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
}

/// Processes whose argv[0] is `berth-shim` and whose command line names `dir`.
fn shims_of(dir: &Path) -> Vec<u32> {
    let dir = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv: Vec<String> =
            raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
        let is_shim = argv.first().is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "berth-shim"));
        if is_shim && argv.join(" ").contains(&dir) {
            out.push(pid);
        }
    }
    out
}

fn kill(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

mod failures;
mod input;
mod isolation;
mod limits;
mod restart;
