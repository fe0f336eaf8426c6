//! `--build-disk` is a hard limit (each instance's `--root` is a filesystem
//! of that size), the end is explained, usage is reported, the node keeps a
//! reserve, and nothing of an instance's disk (image, loop device, mount)
//! outlives it. The state dir of the limit and reserve tests is a small
//! filesystem the test makes, so the free space measured with statfs is
//! only this test's, not that of the other suites sharing the machine.

use berth_shim::disk::{self, DiskSpec};
use berth_tests::disk_leaks;
use berth_tests::harness::{fakeclient, is_instance_end, run_fakeclient, run_json, Agent};
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MI: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(30);

/// A filesystem of `size` bytes made and mounted by the test (with the
/// mechanism under test: a sparse ext4 image on a loop device), holding the
/// agent's state dir.
struct SmallFs {
    _tmp: tempfile::TempDir,
    top: PathBuf,
    state: PathBuf,
}

impl SmallFs {
    fn new(size: u64) -> SmallFs {
        disk::mechanism().unwrap_or_else(|e| panic!("needs loop devices and mkfs.ext4 (.ci/run installs them): {e}"));
        let tmp = tempfile::Builder::new().prefix("berth-diskfs-").tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let top = tmp.path().canonicalize().unwrap();
        let mount = top.join("fs");
        fs::create_dir(&mount).unwrap();
        disk::acquire(&DiskSpec::new(&top, mount.clone(), size), 0, &top.join("templates"))
            .expect("make the test's state filesystem");
        fs::set_permissions(&mount, fs::Permissions::from_mode(0o755)).unwrap();
        SmallFs { state: mount.join("state"), top, _tmp: tmp }
    }

    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.top.join("fs")).unwrap();
        st.blocks_available() as u64 * st.fragment_size() as u64
    }

    /// What an agent whose state dir is here left behind: instance entries,
    /// mounts below the state dir, loop devices bound to images in it.
    fn leaks(&self) -> Vec<String> {
        let mut out = disk_leaks::scan(&self.state);
        if let Ok(rd) = fs::read_dir(self.state.join("instances")) {
            out.extend(rd.flatten().map(|e| format!("instance entry left: {}", e.path().display())));
        }
        let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
        for m in table.lines().filter_map(|l| l.split(' ').nth(4)) {
            if Path::new(m).starts_with(&self.state) {
                out.push(format!("mount left: {m}"));
            }
        }
        out
    }

    async fn wait_clean(&self) -> Vec<String> {
        let t0 = std::time::Instant::now();
        loop {
            let l = self.leaks();
            if l.is_empty() || t0.elapsed() > WAIT {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = berth_shim::teardown::mounts::unmount_below(Path::new("/proc"), &self.top);
        disk_leaks::cleanup(&self.top);
        let _ = disk::settle(&format!("{}/{}", self.top.file_name().unwrap().to_string_lossy(), disk::IMAGE_FILE));
    }
}

fn metrics(agent: &Agent) -> HashMap<String, f64> {
    let addr = agent.http_addr(WAIT).expect("http address");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let body = raw.split("\r\n\r\n").nth(1).expect("http body").to_string();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?))))
        .collect()
}

/// fakeclient as another uid: another client, so another instance.
fn as_uid(agent: &Agent, uid: u32, args: &[&str]) -> berth_tests::harness::ClientRun {
    let mut c = fakeclient(agent.socket());
    c.uid(uid).gid(uid).arg("--timeout").arg("60").args(args);
    run_json(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_past_the_limit_fails_inside_and_the_node_keeps_its_space() {
    let small = SmallFs::new(1024 * MI);
    let agent = Agent::builder("disk-limit")
        .arg("--state-dir")
        .arg(&small.state)
        .args(["--build-disk", "64Mi", "--max-builds", "3", "--idle-timeout", "30s"])
        .args(["--socket-mode", "0666", "--http-addr", "127.0.0.1:0", "--drain-timeout", "1s"])
        .start_async()
        .await;
    let sock = agent.socket().to_path_buf();
    // Instance A (this test's uid) starts; its disk is almost empty.
    assert!(run_fakeclient(&sock, &["ping"]).ok());
    let free0 = small.free();

    // Instance B (another client) writes within its own limit meanwhile.
    let agent_b = std::thread::spawn({
        let sock = sock.clone();
        move || {
            let mut c = fakeclient(&sock);
            c.uid(40123).gid(40123).args(["--timeout", "60", "write-files", "16", "2Mi", "b"]);
            run_json(c)
        }
    });
    let a = run_fakeclient(&sock, &["--timeout", "60", "write-files", "1", "200Mi", "a"]);
    assert_eq!(a.error_code(), Some("ResourceExhausted"), "{a:?}");
    let msg = a.error_message().unwrap_or_default();
    assert!(msg.contains("No space left on device"), "{msg}");
    let b = agent_b.join().unwrap();
    assert!(b.ok(), "the other instance could not write within its limit: {b:?}");
    assert_eq!(b.json["bytes_written"].as_u64(), Some(32 * MI), "{b:?}");

    // Both instances still hold what they wrote: A its 64 MiB, B 32 MiB.
    // Without the limit A alone would have taken 200 MiB.
    let drop = free0.saturating_sub(small.free());
    assert!(drop <= 64 * MI + 32 * MI + 8 * MI, "the state dir lost {} MiB", drop / MI);

    // The fill is logged while the instance runs, with limit and peak.
    let hit = agent
        .wait_log_async(
            0,
            |v| v["reason"] == "disk" && v["message"].as_str().is_some_and(|m| m.contains("filled its disk limit")),
            WAIT,
        )
        .await
        .unwrap_or_else(|| panic!("no disk hit logged:\n{}", agent.log_tail(30)));
    assert_eq!(hit["limit"], "64Mi", "{hit}");
    // statfs counts ext4's own metadata out of the size: full is ~57 of 64 MiB.
    assert!(hit["peak_disk"].as_u64().unwrap() >= 48 * MI, "{hit}");
    assert!(agent.instance_ends().is_empty(), "a full disk ends no instance by itself");
    let m = metrics(&agent);
    assert_eq!(m.get("berth_limit_hits_total{reason=\"disk\"}"), Some(&1.0), "{m:?}");

    // B can still write; A still answers (only its writes fail).
    assert!(as_uid(&agent, 40123, &["write-files", "1", "1Mi", "b2"]).ok());
    assert!(run_fakeclient(&sock, &["ping"]).ok());

    // A's daemon dies with its disk full: the client's connection ends with
    // a GOAWAY saying so, and the end line says disk, limit and peak.
    let mark = agent.log_mark();
    let seen = exit_on_raw_h2(&sock, 1).await;
    assert!(
        seen.contains("its build filled the disk limit of 64Mi") && seen.contains("the daemon exited with status 1"),
        "{seen}"
    );
    let end = agent
        .wait_log_async(mark, |v| is_instance_end(v) && v["reason"] != "idle", WAIT)
        .await
        .unwrap_or_else(|| panic!("no end line:\n{}", agent.log_tail(30)));
    assert_eq!(end["reason"], "disk", "{end}");
    assert_eq!(end["disk_limit"], 64 * MI, "{end}");
    assert!(end["peak_disk"].as_u64().unwrap() >= 48 * MI, "{end}");
    assert!(end["final_disk"].as_u64().unwrap() >= 48 * MI, "{end}");
    let m = metrics(&agent);
    assert_eq!(m.get("berth_instances_ended_total{reason=\"disk\"}"), Some(&1.0));
    assert_eq!(m.get("berth_instance_peak_disk_bytes_count"), Some(&1.0), "{m:?}");

    drop_agent(agent).await;
    let leaks = small.wait_clean().await;
    assert!(leaks.is_empty(), "{leaks:?}");
    // The images are gone: the state filesystem has its space back.
    assert!(free0.saturating_sub(small.free()) < 4 * MI, "{} MiB still used", free0.saturating_sub(small.free()) / MI);
}

/// Fake.Exit as a gRPC call on a raw h2 connection: what a grpc-go client
/// sees of the connection, the GOAWAY debug data (berth's note) included.
async fn exit_on_raw_h2(socket: &Path, code: i32) -> String {
    use prost::Message;
    let msg = berth_tests::proto::fake::ExitRequest { code, message: "no space left on device".into() }.encode_to_vec();
    let (resp, send, client, conn) = berth_tests::grpc::raw_fake_call(socket, "Exit", &msg).await;
    let call = tokio::time::timeout(WAIT, resp).await.expect("call hangs");
    drop((send, client));
    let end = tokio::time::timeout(WAIT, conn).await.expect("connection hangs").unwrap();
    format!("call: {call:?}; connection: {end:?}")
}

/// SIGTERM and wait: the agent drains (1 s) and every instance is wiped.
async fn drop_agent(agent: Agent) {
    agent.sigterm();
    assert!(agent.wait_exit_async(WAIT).await.is_some(), "agent did not exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_dir_refuses_new_builds_and_keeps_running_ones() {
    let small = SmallFs::new(256 * MI);
    let agent = Agent::builder("disk-reserve")
        .arg("--state-dir")
        .arg(&small.state)
        .args(["--build-disk", "32Mi", "--reserve-disk", "64Mi", "--max-builds", "3", "--idle-timeout", "30s"])
        .args(["--socket-mode", "0666", "--http-addr", "127.0.0.1:0", "--drain-timeout", "1s"])
        .start_async()
        .await;
    let sock = agent.socket().to_path_buf();
    assert!(run_fakeclient(&sock, &["write-files", "1", "4Mi"]).ok(), "a build runs while the disk has room");

    // Something else fills the state dir's filesystem below the reserve.
    let filler = small.state.join("filler");
    let free = small.free();
    {
        let mut f = fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; MI as usize];
        for _ in 0..(free - 32 * MI) / MI {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    assert!(small.free() < 64 * MI);

    let refused = as_uid(&agent, 40124, &["ping"]);
    assert_eq!(refused.error_code(), Some("ResourceExhausted"), "{refused:?}");
    let msg = refused.error_message().unwrap_or_default().to_string();
    assert!(msg.contains("disk full") && msg.contains("--reserve-disk 64Mi"), "{msg}");
    assert!(msg.contains(&small.state.display().to_string()), "the message names the state dir: {msg}");
    // The running build goes on.
    let ping = run_fakeclient(&sock, &["ping"]);
    assert!(ping.ok(), "{ping:?}");
    let m = metrics(&agent);
    assert!(m.get("berth_connections_refused_total{reason=\"exhausted\"}").is_some_and(|v| *v >= 1.0), "{m:?}");

    // Space comes back: new builds are admitted again.
    fs::remove_file(&filler).unwrap();
    assert!(as_uid(&agent, 40124, &["ping"]).ok());

    drop_agent(agent).await;
    let leaks = small.wait_clean().await;
    assert!(leaks.is_empty(), "{leaks:?}");
}

fn instance_dirs(agent: &Agent) -> Vec<PathBuf> {
    fs::read_dir(agent.state_dir().join("instances"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_the_disk_is_left_after_an_end_a_crash_or_agent_sigkill() {
    let agent = Agent::builder("disk-leaks")
        .args(["--build-disk", "64Mi", "--max-builds", "2", "--idle-timeout", "1s"])
        .start_async()
        .await;
    let sock = agent.socket().to_path_buf();

    // Normal end (idle).
    assert!(run_fakeclient(&sock, &["write-files", "4", "1Mi"]).ok());
    let dir = instance_dirs(&agent).pop().expect("an instance dir");
    assert!(dir.join(disk::IMAGE_FILE).is_file() && dir.join(disk::LOOP_FILE).is_file());
    assert_eq!(disk_leaks::scan(agent.dir()).len(), 1, "one loop device while the instance runs");
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "after a normal end: {leaks:?}");

    // Daemon crash.
    assert!(run_fakeclient(&sock, &["write-files", "4", "1Mi"]).ok());
    let _ = run_fakeclient(&sock, &["exit", "3", "crash"]);
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "after a daemon crash: {leaks:?}");

    // Agent and shim SIGKILLed: the image stays mounted on its loop device
    // until the restarted agent's sweep deletes the instance from its files.
    assert!(run_fakeclient(&sock, &["write-files", "4", "1Mi"]).ok());
    let dir = instance_dirs(&agent).pop().expect("an instance dir");
    let shim = berth_shim::spec::PidStamp::load(&dir.join(berth_shim::spec::SHIM_PID_FILE)).expect("shim.pid");
    let pid = |p: i32| nix::unistd::Pid::from_raw(p);
    use nix::sys::signal::{kill, Signal};
    let agent_pid = agent.pid().unwrap() as i32;
    kill(pid(agent_pid), Signal::SIGSTOP).unwrap();
    kill(pid(shim.pid), Signal::SIGKILL).unwrap();
    kill(pid(agent_pid), Signal::SIGKILL).unwrap();
    assert!(agent.wait_exit_async(WAIT).await.is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = agent.leak_scan();
    assert!(before.iter().any(|l| l.starts_with("loop device left")), "{before:?}");
    assert!(before.iter().any(|l| l.starts_with("mount left")), "{before:?}");
    let mark = agent.log_mark();
    agent.restart_async().await;
    agent
        .wait_log_async(mark, |v| v["message"] == "start-up sweep done", WAIT)
        .await
        .unwrap_or_else(|| panic!("no sweep:\n{}", agent.log_tail(30)));
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "after agent SIGKILL + restart: {leaks:?}");
    assert!(!dir.exists());
    assert!(run_fakeclient(&sock, &["ping"]).ok(), "the restarted agent serves");
}

#[test]
fn check_tries_the_build_disk_for_real_and_leaves_nothing() {
    let state = tempfile::Builder::new().prefix("berth-diskcheck-").tempdir().unwrap();
    fs::set_permissions(state.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(berth_tests::bin_path("berth-agent"))
        .args(["check", "--daemon", "true", "--state-dir"])
        .arg(state.path().join("s"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("disk limit")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("overlayfs mounts on it in a user namespace"), "{line}");
    assert!(disk_leaks::scan(state.path()).is_empty());
}

mod spares;
