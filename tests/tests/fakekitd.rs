//! fakekitd on its own (no agent): every RPC, the start knobs and shutdown,
//! over a real unix socket in a temp dir.

use berth_tests::harness::{run_fakeclient, ClientRun, LeakScope};
use berth_tests::pattern::{self, Checksum};
use berth_tests::proto::control::{InfoRequest, ListWorkersRequest};
use berth_tests::proto::fake::*;
use berth_tests::{control_client, fake_client, health_check, try_channel};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const FAKEKITD: &str = env!("CARGO_BIN_EXE_fakekitd");

/// A fakekitd child on `<tmp>/kitd.sock` with `--root <tmp>/root`.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    root: PathBuf,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Spawns with the usual buildkitd flags plus `extra` (no waiting).
    fn spawn(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kitd.sock");
        let root = dir.path().join("root");
        let mut child = Command::new(FAKEKITD)
            .arg("--rootless")
            .arg("--addr")
            .arg(format!("unix://{}", socket.display()))
            .arg(format!("--root={}", root.display()))
            .args(["--oci-worker-snapshotter", "native", "--oci-worker-no-process-sandbox"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (buf, err) = (stderr.clone(), child.stderr.take().unwrap());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("fakekitd: | {line}");
                let mut b = buf.lock().unwrap();
                b.push_str(&line);
                b.push('\n');
            }
        });
        Daemon { child, dir, socket, root, stderr, reader: Some(reader) }
    }

    /// Spawns and waits until its "serving on" line is printed.
    async fn start(extra: &[&str]) -> Daemon {
        let d = Daemon::spawn(extra);
        d.wait_stderr("fakekitd: serving on", Duration::from_secs(10)).await;
        d
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    async fn wait_stderr(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} on stderr within {timeout:?}: {}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // All of stderr is in once the pipe is at EOF (Fork children
                // do not inherit it).
                if let Some(r) = self.reader.take() {
                    r.join().unwrap();
                }
                return st;
            }
            assert!(Instant::now() < deadline, "fakekitd still running after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn sigterm(&self) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Fork children orphaned by a failed test name the dir on their
        // command line: the harness cleanup kills them.
        let dir = self.dir.path().canonicalize().unwrap_or_else(|_| self.dir.path().to_path_buf());
        berth_tests::harness::cleanup(&LeakScope {
            state_dir: dir.join("state"),
            cgroup_root: dir.join("no-cgroups"),
            cgroup_parent: "none".into(),
            dir,
        });
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; it is dead for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

fn status_field(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn version_prints_the_fake_version_line() {
    let out = Command::new(FAKEKITD).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "fakekitd github.com/moby/buildkit v0.0.0-fake 0000000\n");
}

#[tokio::test]
async fn health_ping_and_buildkit_control_api() {
    let d = Daemon::start(&[]).await;
    assert_eq!(health_check(&d.socket).await.unwrap(), ServingStatus::Serving);

    let p = fake_client(&d.socket).await.ping(PingRequest {}).await.unwrap().into_inner();
    assert_eq!(p.pid, d.pid(), "same pid namespace here");
    assert_eq!(p.ppid, std::process::id());
    assert_eq!(p.uid, nix::unistd::getuid().as_raw());
    assert_eq!(p.root, d.root.to_string_lossy());
    assert!(d.root.is_dir(), "--root is created");
    assert_eq!(p.addrs, vec![format!("unix://{}", d.socket.display())]);
    assert!(p.args.contains(&"--oci-worker-no-process-sandbox".to_string()), "{:?}", p.args);
    let my_userns = std::fs::read_link("/proc/self/ns/user").unwrap();
    assert_eq!(p.ns_user, my_userns.to_string_lossy());
    assert!(p.ns_pid.starts_with("pid:[") && p.ns_mnt.starts_with("mnt:["), "{p:?}");
    assert_eq!(p.uid_map, std::fs::read_to_string("/proc/self/uid_map").unwrap());
    assert_eq!(p.hostname, nix::unistd::gethostname().unwrap().to_string_lossy());
    assert_eq!(p.home, std::env::var("HOME").unwrap_or_default());
    assert!(p.cgroup.contains("pids:") || p.cgroup.contains("0::"), "{}", p.cgroup);
    assert_eq!(p.token.len(), 24);
    // The token tells daemons apart; it is stable for one daemon.
    let again = fake_client(&d.socket).await.ping(PingRequest {}).await.unwrap().into_inner();
    assert_eq!(again.token, p.token);
    let other = Daemon::start(&[]).await;
    let q = fake_client(&other.socket).await.ping(PingRequest {}).await.unwrap().into_inner();
    assert_ne!(q.token, p.token);

    let mut ctl = control_client(&d.socket).await;
    let info = ctl.info(InfoRequest {}).await.unwrap().into_inner();
    let v = info.buildkit_version.unwrap();
    assert_eq!(
        (v.package.as_str(), v.version.as_str(), v.revision.as_str()),
        ("github.com/moby/buildkit", "v0.0.0-fake", "0000000")
    );
    let w = ctl.list_workers(ListWorkersRequest { filter: vec![] }).await.unwrap().into_inner();
    assert_eq!(w.record.len(), 1);
    assert_eq!(w.record[0].id, "fake");
    let plat = &w.record[0].platforms[0];
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    assert_eq!((plat.os.as_str(), plat.architecture.as_str()), ("linux", arch));
}

#[tokio::test]
async fn runs_on_one_thread() {
    let d = Daemon::start(&[]).await;
    // Exercise the runtime first: a stream and a few calls.
    let mut c = fake_client(&d.socket).await;
    let mut s =
        c.stream(StreamRequest { total_bytes: 100_000, chunk_bytes: 10_000, delay_ms: 0 }).await.unwrap().into_inner();
    while s.next().await.is_some() {}
    c.ping(PingRequest {}).await.unwrap();
    assert_eq!(status_field(d.pid(), "Threads"), 1, "a pids limit counts threads");
}

#[tokio::test]
async fn serves_every_addr() {
    let dir = tempfile::tempdir().unwrap();
    let second = dir.path().join("second.sock");
    let d = Daemon::start(&["--addr", &format!("unix://{}", second.display())]).await;
    let a = fake_client(&d.socket).await.ping(PingRequest {}).await.unwrap().into_inner();
    let b = fake_client(&second).await.ping(PingRequest {}).await.unwrap().into_inner();
    assert_eq!(a.token, b.token);
    assert_eq!(a.addrs.len(), 2);
}

#[tokio::test]
async fn write_files_lands_under_root_with_the_pattern() {
    let d = Daemon::start(&[]).await;
    let mut c = fake_client(&d.socket).await;
    let r = c
        .write_files(WriteFilesRequest { count: 3, size_bytes: 100_000, subdir: "a/b".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.bytes_written, r.files_written), (300_000, 3));
    let dir = d.root.join("a/b");
    assert_eq!(Path::new(&r.dir), dir);
    let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    assert_eq!(names.len(), 3);
    for n in &names {
        let data = std::fs::read(n).unwrap();
        assert_eq!(data, pattern::chunk(0, 100_000), "{}", n.display());
    }
    // More files never overwrite earlier ones.
    c.write_files(WriteFilesRequest { count: 2, size_bytes: 1, subdir: "a/b".into() }).await.unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 5);

    for bad in ["../escape", "/abs", "a/../../x"] {
        let e = c.write_files(WriteFilesRequest { count: 1, size_bytes: 1, subdir: bad.into() }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e:?}");
    }
    assert!(!d.dir.path().join("escape").exists());
}

#[tokio::test]
async fn symlink_is_planted_inside_root() {
    let d = Daemon::start(&[]).await;
    let mut c = fake_client(&d.socket).await;
    let r = c
        .symlink(SymlinkRequest { target: "/etc".into(), link_name: "evil/etc-link".into() })
        .await
        .unwrap()
        .into_inner();
    let link = d.root.join("evil/etc-link");
    assert_eq!(Path::new(&r.path), link);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/etc"));
    let dup = c.symlink(SymlinkRequest { target: "/x".into(), link_name: "evil/etc-link".into() }).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let esc = c.symlink(SymlinkRequest { target: "/etc".into(), link_name: "../outside".into() }).await.unwrap_err();
    assert_eq!(esc.code(), Code::InvalidArgument);
    assert!(std::fs::symlink_metadata(d.dir.path().join("outside")).is_err());

    // ReadPath sees it as a link, and the dir listing shows it.
    let rp = c.read_path(ReadPathRequest { path: r.path.clone(), max_bytes: 0 }).await.unwrap().into_inner();
    assert_eq!((rp.kind.as_str(), rp.link_target.as_str()), ("symlink", "/etc"));
    let ls = c
        .read_path(ReadPathRequest { path: d.root.join("evil").display().to_string(), max_bytes: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ls.entries, vec!["etc-link"]);
    let missing =
        c.read_path(ReadPathRequest { path: "/nonexistent/x".into(), max_bytes: 0 }).await.unwrap().into_inner();
    assert!(missing.kind.is_empty() && !missing.error.is_empty(), "{missing:?}");
}

#[tokio::test]
async fn alloc_holds_resident_memory() {
    let d = Daemon::start(&[]).await;
    let before = status_field(d.pid(), "VmRSS");
    let mut c = fake_client(&d.socket).await;
    let r = c.alloc(AllocRequest { bytes: 64 << 20 }).await.unwrap().into_inner();
    assert!(r.ok);
    assert_eq!(r.held_bytes, 64 << 20);
    let after = status_field(d.pid(), "VmRSS");
    assert!(after >= before + 60 * 1024, "VmRSS {before} kB -> {after} kB");
    let r2 = c.alloc(AllocRequest { bytes: 1 << 20 }).await.unwrap().into_inner();
    assert_eq!(r2.held_bytes, 65 << 20);
    assert_eq!(c.ping(PingRequest {}).await.unwrap().into_inner().held_bytes, 65 << 20);
}

#[tokio::test]
async fn fork_children_live_until_sigterm_which_exits_1() {
    let mut d = Daemon::start(&[]).await;
    let mut c = fake_client(&d.socket).await;
    let r = c.fork(ForkRequest { count: 3 }).await.unwrap().into_inner();
    assert_eq!((r.started, r.held, r.error.as_str()), (3, 3, ""));
    assert_eq!(r.pids.len(), 3);
    for &pid in &r.pids {
        assert!(alive(pid), "child {pid}");
        // spawn() returns once exec closed the CLOEXEC pipe, which is a moment
        // before the kernel sets up the new argv: cmdline can read empty briefly.
        let mut cmd = String::new();
        for _ in 0..100 {
            cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).into_owned();
            if !cmd.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(cmd.contains("--sleeper") && cmd.contains(&*d.root.to_string_lossy()), "{cmd}");
    }
    assert_eq!(c.ping(PingRequest {}).await.unwrap().into_inner().children, 3);

    d.sigterm();
    let st = d.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(st.code(), Some(1), "{st:?}");
    assert!(d.stderr().contains("context canceled"), "{}", d.stderr());
    for &pid in &r.pids {
        assert!(!alive(pid), "child {pid} outlived a clean shutdown");
    }
    assert!(!d.socket.exists(), "socket removed on clean shutdown");
}

#[tokio::test]
async fn fork_reports_the_pids_limit() {
    let pids_root = Path::new("/sys/fs/cgroup/pids");
    if !pids_root.join("cgroup.procs").exists() {
        eprintln!(
            "SKIPPED: fork_reports_the_pids_limit: no cgroup v1 pids hierarchy at /sys/fs/cgroup/pids on this host"
        );
        return;
    }
    let d = Daemon::start(&[]).await;
    let cg = pids_root.join(format!("berth-test-fakekitd-{}", std::process::id()));
    std::fs::create_dir_all(&cg).unwrap();
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            for _ in 0..100 {
                for pid in std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default().lines() {
                    let pid = nix::unistd::Pid::from_raw(pid.trim().parse().unwrap_or(0));
                    if pid.as_raw() > 0 {
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    }
                }
                if std::fs::remove_dir(&self.0).is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let _rm = Rm(cg.clone());
    std::fs::write(cg.join("pids.max"), "3").unwrap();
    std::fs::write(cg.join("cgroup.procs"), d.pid().to_string()).unwrap();

    let mut c = fake_client(&d.socket).await;
    let r = c.fork(ForkRequest { count: 5 }).await.unwrap().into_inner();
    assert_eq!(r.started, 2, "{r:?}");
    assert!(r.error.contains("Resource temporarily unavailable"), "{r:?}");
    let events = std::fs::read_to_string(cg.join("pids.events")).unwrap_or_default();
    assert!(!events.contains("max 0"), "{events}");
    // Dropping `_rm` kills what is left in the cgroup (the daemon and its
    // children) and removes it.
}

#[tokio::test]
async fn stream_is_deterministic_in_order_and_paced() {
    let d = Daemon::start(&[]).await;
    let mut c = fake_client(&d.socket).await;
    let total = (1 << 20) + 7;
    let mut s =
        c.stream(StreamRequest { total_bytes: total, chunk_bytes: 65536, delay_ms: 0 }).await.unwrap().into_inner();
    let mut sum = Checksum::new();
    let mut chunks = 0;
    while let Some(m) = s.next().await {
        let m = m.unwrap();
        assert_eq!(m.offset, sum.len());
        sum.update(&m.data);
        chunks += 1;
    }
    assert_eq!(chunks, 17);
    assert_eq!(sum, pattern::expected(total));

    let start = Instant::now();
    let mut s =
        c.stream(StreamRequest { total_bytes: 5000, chunk_bytes: 1000, delay_ms: 100 }).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(m) = s.next().await {
        m.unwrap();
        n += 1;
    }
    assert_eq!(n, 5);
    assert!(start.elapsed() >= Duration::from_millis(400), "{:?}", start.elapsed());
}

#[tokio::test]
async fn echo_returns_what_was_sent() {
    let d = Daemon::start(&[]).await;
    let mut c = fake_client(&d.socket).await;
    let msgs: Vec<EchoMessage> = (0..20u64).map(|i| EchoMessage { data: pattern::chunk(i * 1000, 1000) }).collect();
    let mut s = c.echo(tokio_stream::iter(msgs)).await.unwrap().into_inner();
    let mut sum = Checksum::new();
    while let Some(m) = s.next().await {
        sum.update(&m.unwrap().data);
    }
    assert_eq!(sum, pattern::expected(20_000));
}

#[tokio::test]
async fn hang_never_replies_but_the_daemon_keeps_serving() {
    let d = Daemon::start(&[]).await;
    let mut c = fake_client(&d.socket).await;
    let r = tokio::time::timeout(Duration::from_millis(500), c.hang(HangRequest {})).await;
    assert!(r.is_err(), "Hang replied: {r:?}");
    c.ping(PingRequest {}).await.unwrap();
}

#[tokio::test]
async fn exit_prints_and_exits_with_the_code() {
    let mut d = Daemon::start(&[]).await;
    let mut c = fake_client(&d.socket).await;
    let e = c.exit(ExitRequest { code: 7, message: "bye: simulated crash".into() }).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    let st = d.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(st.code(), Some(7));
    assert!(d.stderr().contains("bye: simulated crash\n"), "{}", d.stderr());
    assert!(d.socket.exists(), "a crash leaves its socket file behind");
}

#[tokio::test]
async fn fail_start_prints_and_exits_1_without_a_socket() {
    let mut d = Daemon::spawn(&["--fail-start=buildkitd: no user namespaces"]);
    let st = d.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(st.code(), Some(1));
    assert!(d.stderr().contains("buildkitd: no user namespaces\n"), "{}", d.stderr());
    assert!(!d.stderr().contains("serving on"), "{}", d.stderr());
    assert!(!d.socket.exists());
}

#[tokio::test]
async fn start_delay_postpones_the_socket() {
    let mut d = Daemon::spawn(&["--start-delay=1500"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!d.socket.exists(), "socket before the delay passed");
    assert!(d.child.try_wait().unwrap().is_none());
    d.wait_stderr("serving on", Duration::from_secs(10)).await;
    assert_eq!(health_check(&d.socket).await.unwrap(), ServingStatus::Serving);
}

#[tokio::test]
async fn socket_early_exists_before_it_serves() {
    let start = Instant::now();
    let d = Daemon::spawn(&["--socket-early", "--start-delay=2000"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.socket.exists() {
        assert!(Instant::now() < deadline, "no early socket");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(std::fs::symlink_metadata(&d.socket).unwrap().file_type().is_socket());
    // It accepts the connection but does not answer yet.
    if start.elapsed() < Duration::from_millis(1200) {
        let ch = try_channel(&d.socket).await;
        if let Ok(ch) = ch {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            let r = tokio::time::timeout(
                Duration::from_millis(300),
                h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }),
            )
            .await;
            assert!(r.is_err(), "answered before the start delay: {r:?}");
        }
        assert!(!d.stderr().contains("serving on"));
    }
    d.wait_stderr("serving on", Duration::from_secs(10)).await;
    assert!(start.elapsed() >= Duration::from_millis(2000));
    assert_eq!(health_check(&d.socket).await.unwrap(), ServingStatus::Serving);
}

#[tokio::test]
async fn fail_start_after_an_early_socket() {
    let mut d = Daemon::spawn(&["--socket-early", "--start-delay=300", "--fail-start=late failure"]);
    let st = d.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(st.code(), Some(1));
    assert!(d.stderr().contains("late failure"), "{}", d.stderr());
    assert!(d.socket.exists(), "the early socket stays, like a crashed daemon's");
}

#[tokio::test]
async fn no_health_leaves_list_workers_as_the_probe() {
    let d = Daemon::start(&["--no-health"]).await;
    let e = health_check(&d.socket).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    let w = control_client(&d.socket).await.list_workers(ListWorkersRequest { filter: vec![] }).await.unwrap();
    assert_eq!(w.into_inner().record[0].id, "fake");
}

#[tokio::test]
async fn sigterm_while_idle_exits_1_not_by_signal() {
    let mut d = Daemon::start(&[]).await;
    d.sigterm();
    let st = d.wait_exit(Duration::from_secs(10)).await;
    assert_eq!((st.code(), st.signal()), (Some(1), None));
}

#[tokio::test]
async fn sigterm_during_start_delay_exits_1() {
    let mut d = Daemon::spawn(&["--start-delay=30000"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.sigterm();
    let st = d.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(st.code(), Some(1));
}

#[test]
fn bad_known_flag_is_a_usage_error() {
    let out = Command::new(FAKEKITD).arg("--start-delay=later").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration"));
}

/// `--addr fd://` (issue 15) takes the socket-activation fds only when
/// LISTEN_PID is its own pid, as buildkitd (go-systemd) does; the positive
/// path (fd 3 from the shim) is tests/tests/handoff.rs.
#[test]
fn fd_addr_without_activation_for_this_pid_is_refused() {
    for (pid, fds) in [(None, None), (Some("1"), Some("1")), (Some("1"), None)] {
        let mut cmd = Command::new(FAKEKITD);
        cmd.args(["--addr", "fd://", "--root", "/nonexistent-berth-root"]);
        cmd.env_remove("LISTEN_PID").env_remove("LISTEN_FDS");
        if let Some(p) = pid {
            cmd.env("LISTEN_PID", p);
        }
        if let Some(n) = fds {
            cmd.env("LISTEN_FDS", n);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{pid:?} {fds:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no sockets found via socket activation"), "{err}");
    }
    let out = Command::new(FAKEKITD).args(["--addr", "fd://4"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not supported yet"));
}

fn client(d: &Daemon, args: &[&str]) -> ClientRun {
    let run = run_fakeclient(&d.socket, args);
    eprintln!("fakeclient {args:?} -> {} {}", run.status, run.stdout.trim());
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakeclient_prints_json_and_exits_3_on_errors() {
    let d = Daemon::start(&[]).await;
    let d = tokio::task::spawn_blocking(move || {
        let ping = client(&d, &["ping"]);
        assert!(ping.ok(), "{ping:?}");
        assert_eq!(ping.json["pid"], d.pid());
        assert_eq!(ping.json["root"], d.root.to_string_lossy().as_ref());

        let st = client(&d, &["stream", "300000", "4096", "0"]);
        assert_eq!(st.json["ok"], true, "{st:?}");
        assert_eq!(st.json["bytes"], 300000);

        let wf = client(&d, &["write-files", "2", "1Ki", "x"]);
        assert_eq!(wf.json["bytes_written"], 2048, "{wf:?}");

        let bad = client(&d, &["write-files", "1", "1", "../x"]);
        assert_eq!(bad.status.code(), Some(3));
        assert_eq!(bad.error_code(), Some("InvalidArgument"), "{bad:?}");

        let hang = client(&d, &["--timeout", "0.3", "hang"]);
        assert_eq!(hang.status.code(), Some(3));
        assert_eq!(hang.error_code(), Some("DeadlineExceeded"));

        let w = client(&d, &["workers"]);
        assert_eq!(w.json["workers"][0]["id"], "fake");
        assert_eq!(client(&d, &["health"]).json["status"], "SERVING");
        d
    })
    .await
    .unwrap();

    let missing = run_fakeclient(&d.dir.path().join("nope.sock"), &["ping"]);
    assert_eq!(missing.status.code(), Some(3));
    assert_eq!(missing.error_code(), Some("Unavailable"));
    assert!(missing.error_message().unwrap().contains("No such file"), "{missing:?}");

    let exit = run_fakeclient(&d.socket, &["exit", "5", "going away"]);
    assert_eq!(exit.status.code(), Some(3), "{exit:?}");
    assert!(exit.error_code().is_some());
}
