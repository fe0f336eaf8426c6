//! Core end-to-end suite (issue 2): the real `berth-agent`, `berth-shim`,
//! `fakekitd` and `fakeclient` over real sockets, as root, with real
//! namespaces and v1 cgroups. Every test runs its own [`Agent`] (its own temp
//! dir, state dir, cgroup parent and id pool), so the tests run in parallel.
//!
//! Build the binaries first: `cargo build --workspace --bins`.

use berth_tests::grpc::fake_client;
use berth_tests::harness::{self, fakeclient, is_instance_end, run_json, Agent, AgentBuilder, ClientRun, LeakScope};
use berth_tests::proto::fake::{ForkRequest, PingReply, PingRequest, SymlinkRequest, WriteFilesRequest};
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on one gRPC call through the agent (spawn + ready + call).
const CALL: Duration = Duration::from_secs(20);
/// Bound on waiting for an instance's end line.
const END: Duration = Duration::from_secs(15);
/// Bound on waiting for the leak scan to come back empty.
const CLEAN: Duration = Duration::from_secs(15);

/// An agent builder with the settings every test here wants: explicit slots,
/// a short stop grace, and (for the uid tests) a socket other uids can use.
fn agent(name: &str, max_builds: u32, idle: &str) -> AgentBuilder {
    Agent::builder(name)
        .arg("--max-builds")
        .arg(max_builds.to_string())
        .arg("--idle-timeout")
        .arg(idle)
        .arg("--stop-grace")
        .arg("500ms")
        .arg("--socket-mode")
        .arg("0666")
}

/// Fake.Ping on a fresh connection to `socket`.
async fn try_ping(socket: &Path) -> Result<PingReply, tonic::Status> {
    let mut c = fake_client(socket).await;
    match tokio::time::timeout(CALL, c.ping(PingRequest {})).await {
        Ok(r) => r.map(|r| r.into_inner()),
        Err(_) => panic!("Ping through {} did not return within {CALL:?}", socket.display()),
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
    c.uid(uid).gid(uid).arg("--timeout").arg("30").args(args);
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

/// Host dirs of the instance's cgroups, from the daemon's own `/proc/self/cgroup`
/// (the instance shares the host's cgroup namespace): every line naming `berth-<id>`.
fn instance_cgroup_dirs(cgroup: &str, id: &str) -> Vec<PathBuf> {
    let leaf = format!("berth-{id}");
    cgroup
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrl, path) = (it.next()?, it.next()?, it.next()?);
            if !path.split('/').any(|c| c == leaf) || ctrl.is_empty() {
                return None;
            }
            let ctrl = ctrl.trim_start_matches("name=");
            Some(Path::new("/sys/fs/cgroup").join(ctrl).join(path.trim_start_matches('/')))
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

// ---------------------------------------------------------------------------
// 1. A call through the agent socket reaches the instance.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_through_agent_reaches_the_instance() {
    let agent = agent("core-ping", 2, "1s").start_async().await;
    let r = ping(&agent).await;

    let instances = agent.state_dir().join("instances");
    assert!(Path::new(&r.root).starts_with(&instances), "root {} is not under {}", r.root, instances.display());
    let id = instance_id_of_root(&agent, &r.root);
    let want_addr = format!("unix://{}/{id}/run/buildkitd.sock", instances.display());
    let addr_pos = r.args.iter().position(|a| a == "--addr");
    assert!(
        addr_pos.is_some_and(|i| r.args.get(i + 1) == Some(&want_addr)),
        "args {:?} lack `--addr {want_addr}`",
        r.args
    );
    assert!(r.args.windows(2).any(|w| w[0] == "--root" && w[1] == r.root), "{:?}", r.args);
    assert!(r.addrs.contains(&want_addr), "addrs {:?}", r.addrs);
    assert!(!r.token.is_empty());

    let end = end_line(&agent, &id).await;
    assert_eq!(end["reason"], "idle", "{end}");
    assert_clean(&agent, "after the idle end").await;
}

// ---------------------------------------------------------------------------
// 2. The instance is in its own namespaces with its own id range.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_runs_in_its_own_namespaces_with_a_pool_range() {
    let agent = agent("core-ns", 2, "1s").start_async().await;
    let r = ping(&agent).await;
    let id = instance_id_of_root(&agent, &r.root);
    let agent_pid = agent.pid().expect("agent running");
    let ns =
        |pid: &str, name: &str| fs::read_link(format!("/proc/{pid}/ns/{name}")).unwrap().to_string_lossy().into_owned();

    assert_ne!(r.ns_user, ns(&agent_pid.to_string(), "user"), "same user namespace as the agent");
    assert!(r.ns_user.starts_with("user:["), "{}", r.ns_user);
    for (name, got) in [("pid", &r.ns_pid), ("mnt", &r.ns_mnt), ("ipc", &r.ns_ipc), ("uts", &r.ns_uts)] {
        assert!(got.starts_with(&format!("{name}:[")), "{name}: {got}");
        assert_ne!(got, &ns("self", name), "{name} namespace is the host's");
        assert_ne!(got, &ns(&agent_pid.to_string(), name), "{name} namespace is the agent's");
    }

    let (pool_base, pool_count) = agent.idmap();
    let (pool_lo, pool_hi) = (pool_base as u64, pool_base as u64 + pool_count as u64);
    for (what, map) in [("uid_map", &r.uid_map), ("gid_map", &r.gid_map)] {
        let (lo, hi) = single_range(map);
        assert!(lo >= pool_lo && hi <= pool_hi, "{what} range [{lo}, {hi}) is outside the pool [{pool_lo}, {pool_hi})");
        assert_eq!((lo - pool_lo) % 65536, 0, "{what} base {lo} not aligned in the pool");
    }
    assert_eq!(single_range(&r.uid_map), single_range(&r.gid_map));
    assert_eq!((r.uid, r.gid), (0, 0), "daemon is not root inside its namespace");
    assert_eq!(r.pid, 1, "daemon is not pid 1 of its pid namespace");
    assert_eq!(r.hostname, format!("berth-{id}"));

    end_line(&agent, &id).await;
    assert_clean(&agent, "after the idle end").await;
}

// ---------------------------------------------------------------------------
// 3. Two clients, two instances, disjoint id ranges.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_get_two_instances_with_disjoint_ranges() {
    let agent = agent("core-two-clients", 2, "3s").start_async().await;
    let a = fc_ok(&agent, 1000, &["ping"]).await;
    let b = fc_ok(&agent, 1001, &["ping"]).await;
    let ta = a["token"].as_str().unwrap().to_string();
    let tb = b["token"].as_str().unwrap().to_string();
    assert_ne!(ta, tb, "uid 1000 and uid 1001 got the same instance");
    let ia = instance_id_of_root(&agent, a["root"].as_str().unwrap());
    let ib = instance_id_of_root(&agent, b["root"].as_str().unwrap());
    assert_ne!(ia, ib);

    // Both alive at once: both dirs exist and both answer again with their token.
    for id in [&ia, &ib] {
        assert!(agent.state_dir().join("instances").join(id).is_dir(), "{id} not alive");
    }
    let a2 = fc_ok(&agent, 1000, &["ping"]).await;
    let b2 = fc_ok(&agent, 1001, &["ping"]).await;
    assert_eq!(a2["token"], ta.as_str(), "uid 1000's instance changed");
    assert_eq!(b2["token"], tb.as_str(), "uid 1001's instance changed");

    for key in ["uid_map", "gid_map"] {
        let (alo, ahi) = single_range(a[key].as_str().unwrap());
        let (blo, bhi) = single_range(b[key].as_str().unwrap());
        assert!(ahi <= blo || bhi <= alo, "{key}: [{alo},{ahi}) and [{blo},{bhi}) overlap");
    }
    assert_ne!(a["ns"]["user"], b["ns"]["user"]);
    assert_ne!(a["ns"]["pid"], b["ns"]["pid"]);
    assert_ne!(a["ns"]["mnt"], b["ns"]["mnt"]);

    end_line(&agent, &ia).await;
    end_line(&agent, &ib).await;
    assert_clean(&agent, "after both ended").await;
}

// ---------------------------------------------------------------------------
// 4. Client scope shares one instance across connections; connection scope does not.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_scope_shares_and_connection_scope_does_not() {
    // Client scope: two connections, one after the other, same instance.
    let ca = agent("core-scope-client", 2, "2s").start_async().await;
    let p1 = ping(&ca).await; // its connection is dropped on return
    let p2 = ping(&ca).await;
    assert_eq!(p1.token, p2.token, "client scope: a second connection got another instance");
    // Also two connections open at once.
    let mut c3 = fake_client(ca.socket()).await;
    let mut c4 = fake_client(ca.socket()).await;
    let t3 = c3.ping(PingRequest {}).await.unwrap().into_inner().token;
    let t4 = c4.ping(PingRequest {}).await.unwrap().into_inner().token;
    assert_eq!((t3.as_str(), t4.as_str()), (p1.token.as_str(), p1.token.as_str()));
    drop((c3, c4));
    let id = instance_id_of_root(&ca, &p1.root);
    let end = end_line(&ca, &id).await;
    assert_eq!(end["reason"], "idle", "{end}");
    assert_eq!(ca.instance_ends().len(), 1, "client scope started more than one instance");

    // Connection scope: each connection its own instance, ended when it closes.
    let cc = agent("core-scope-conn", 2, "60s").arg("--scope").arg("connection").start_async().await;
    let mut k1 = fake_client(cc.socket()).await;
    let mut k2 = fake_client(cc.socket()).await;
    let r1 = k1.ping(PingRequest {}).await.unwrap().into_inner();
    let r2 = k2.ping(PingRequest {}).await.unwrap().into_inner();
    assert_ne!(r1.token, r2.token, "connection scope: two connections shared an instance");
    let (id1, id2) = (instance_id_of_root(&cc, &r1.root), instance_id_of_root(&cc, &r2.root));
    assert_ne!(id1, id2);

    drop(k1);
    let e1 = end_line(&cc, &id1).await;
    assert_eq!(e1["reason"], "closed", "{e1}");
    // The other connection's instance is untouched.
    let again = k2.ping(PingRequest {}).await.unwrap().into_inner();
    assert_eq!(again.token, r2.token);
    assert!(cc.state_dir().join("instances").join(&id2).is_dir());
    drop(k2);
    let e2 = end_line(&cc, &id2).await;
    assert_eq!(e2["reason"], "closed", "{e2}");
    assert_clean(&cc, "connection scope after both closed").await;
    assert_clean(&ca, "client scope after idle").await;
}

// ---------------------------------------------------------------------------
// 5. OOM kills only that instance.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_kills_only_that_instance() {
    let agent = agent("core-oom", 2, "3s").arg("--build-memory").arg("64Mi").start_async().await;
    let a = fc_ok(&agent, 1000, &["ping"]).await;
    let b = fc_ok(&agent, 1001, &["ping"]).await;
    let ia = instance_id_of_root(&agent, a["root"].as_str().unwrap());
    let tb = b["token"].as_str().unwrap().to_string();

    // The allocation, and B's pings while it runs.
    let mut alloc = fc(&agent, 1000, &["alloc", "256Mi"]);
    alloc.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
    let alloc_child = alloc.spawn().unwrap();
    let alloc_task = tokio::task::spawn_blocking(move || {
        let out = alloc_child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    let mut during = 0;
    while !alloc_task.is_finished() || during == 0 {
        let r = fc_ok(&agent, 1001, &["ping"]).await;
        assert_eq!(r["token"], tb.as_str(), "B's instance changed while A hit its memory limit");
        during += 1;
        if during > 200 {
            panic!("alloc of 256Mi over a 64Mi limit did not end");
        }
    }
    let out = alloc_task.await.unwrap();
    let json: Value = out.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
    assert!(json.get("error").is_some_and(Value::is_object), "A's 256Mi alloc over a 64Mi limit did not fail: {out}");

    let end = end_line(&agent, &ia).await;
    assert_eq!(end["oom_killed"], true, "{end}");
    assert_eq!(end["reason"], "oom", "{end}");

    // B still answers, same instance, and did not end.
    let after = fc_ok(&agent, 1001, &["ping"]).await;
    assert_eq!(after["token"], tb.as_str());
    let ib = instance_id_of_root(&agent, b["root"].as_str().unwrap());
    assert!(!agent.instance_ends().iter().any(|v| v["instance"] == ib.as_str()), "B's instance ended along with A's");
    let eb = end_line(&agent, &ib).await;
    assert_eq!(eb["reason"], "idle", "{eb}");
    assert_eq!(eb["oom_killed"], false, "{eb}");
    assert_clean(&agent, "after the OOM and B's idle end").await;
}

// ---------------------------------------------------------------------------
// 6. The pids limit fails only that instance.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_limit_fails_only_that_instance() {
    let agent = agent("core-pids", 2, "2s").arg("--build-pids").arg("32").start_async().await;
    let a = fc_ok(&agent, 1000, &["ping"]).await;
    let ia = instance_id_of_root(&agent, a["root"].as_str().unwrap());
    let fa = fc_ok(&agent, 1000, &["fork", "64"]).await;
    let started = fa["started"].as_u64().unwrap();
    assert!(started < 64, "64 forks under a pids limit of 32 all started: {fa}");
    assert!(!fa["error"].as_str().unwrap().is_empty(), "no fork error reported: {fa}");
    let a2 = fc_ok(&agent, 1000, &["ping"]).await;
    assert_eq!(a2["token"], a["token"], "the forks went to another instance");
    assert_eq!(a2["children"].as_u64(), Some(started), "{a2}");

    let b = fc_ok(&agent, 1001, &["ping"]).await;
    assert_ne!(b["token"], a["token"]);
    let fb = fc_ok(&agent, 1001, &["fork", "8"]).await;
    assert_eq!(fb["started"], 8, "the other instance cannot fork: {fb}");
    assert_eq!(fb["error"], "", "{fb}");

    let end = end_line(&agent, &ia).await;
    assert!(end["pids_limit_hits"].as_u64().is_some_and(|n| n > 0), "pids_limit_hits not > 0 in {end}");
    let ib = instance_id_of_root(&agent, b["root"].as_str().unwrap());
    let eb = end_line(&agent, &ib).await;
    assert_eq!(eb["pids_limit_hits"], 0, "{eb}");
    assert_clean(&agent, "after both ended").await;
}

// ---------------------------------------------------------------------------
// 7. After the idle end nothing of the instance is left.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_end_leaves_nothing() {
    let agent = agent("core-leak", 2, "1s").start_async().await;
    let mut c = fake_client(agent.socket()).await;
    let w = c
        .write_files(WriteFilesRequest { count: 20, size_bytes: 64 * 1024, subdir: "cache/layers".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.files_written, 20);
    let f = c.fork(ForkRequest { count: 4 }).await.unwrap().into_inner();
    assert_eq!(f.started, 4, "{f:?}");
    let r = c.ping(PingRequest {}).await.unwrap().into_inner();
    let id = instance_id_of_root(&agent, &r.root);
    let inst_dir = agent.state_dir().join("instances").join(&id);

    let cgroups = instance_cgroup_dirs(&r.cgroup, &id);
    let ctrls: Vec<String> = cgroups
        .iter()
        .map(|d| d.strip_prefix("/sys/fs/cgroup").unwrap().components().next().unwrap())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for want in ["memory", "pids", "cpu"] {
        assert!(ctrls.iter().any(|c| c.split(',').any(|x| x == want)), "no {want} cgroup in {:?}", r.cgroup);
    }
    let mut host_pids = Vec::new();
    for d in &cgroups {
        assert!(d.is_dir(), "instance cgroup {} missing while alive", d.display());
        let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap();
        host_pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    host_pids.sort_unstable();
    host_pids.dedup();
    assert!(host_pids.len() >= 5, "daemon + 4 sleepers not in the cgroups: {host_pids:?}");
    let (lo, _) = single_range(&r.uid_map);
    let lease = agent.state_dir().join("leases").join(lo.to_string());
    assert!(lease.exists(), "no lease {} while alive", lease.display());
    assert!(inst_dir.is_dir());
    drop(c);

    let end = end_line(&agent, &id).await;
    assert_eq!(end["reason"], "idle", "{end}");
    assert_clean(&agent, "after the idle end").await;
    assert!(!inst_dir.exists(), "{} left", inst_dir.display());
    assert!(!lease.exists(), "lease {} left", lease.display());
    for d in &cgroups {
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
    for pid in host_pids {
        if let Some(argv) = proc_argv(pid) {
            assert!(
                !argv.contains(agent.dir().to_string_lossy().as_ref()),
                "instance process {pid} still running: {argv}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 8. Symlinks planted in the state dir are not followed by the wipe.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wipe_does_not_follow_planted_symlinks() {
    let agent = agent("core-symlink", 2, "1s").start_async().await;
    let victims = tempfile::Builder::new().prefix("berth-victims-").tempdir().unwrap();
    let vdir = victims.path().canonicalize().unwrap();
    let victim = vdir.join("victim.txt");
    fs::write(&victim, "victim file: must survive the wipe\n").unwrap();
    fs::create_dir(vdir.join("dir")).unwrap();
    fs::write(vdir.join("dir/keep.txt"), "keep me\n").unwrap();
    fs::create_dir(vdir.join("dir/sub")).unwrap();
    fs::write(vdir.join("dir/sub/deep.txt"), "deep\n").unwrap();
    // A marker beside the agent's own state dir, reached by a relative link.
    let marker = agent.dir().join("marker.txt");
    fs::write(&marker, "marker\n").unwrap();

    let mut c = fake_client(agent.socket()).await;
    let links: Vec<(String, String)> = vec![
        (victim.display().to_string(), "victim-file".into()),
        (vdir.join("dir").display().to_string(), "victim-dir".into()),
        (vdir.join("dir").display().to_string(), "nested/a/b/victim-dir".into()),
        (vdir.display().to_string(), "nested/victims".into()),
        // root/ -> instance dir -> instances -> state -> the agent's temp dir
        ("../../../..".into(), "up".into()),
        (agent.dir().display().to_string(), "agent-dir".into()),
        ("/".into(), "slash".into()),
    ];
    for (target, link_name) in &links {
        c.symlink(SymlinkRequest { target: target.clone(), link_name: link_name.clone() })
            .await
            .unwrap_or_else(|e| panic!("Symlink {link_name} -> {target}: {e:?}"));
    }
    let r = c.ping(PingRequest {}).await.unwrap().into_inner();
    let id = instance_id_of_root(&agent, &r.root);
    let planted = Path::new(&r.root).join("victim-dir");
    assert!(
        fs::symlink_metadata(&planted).unwrap().file_type().is_symlink(),
        "{} is not a symlink on the host",
        planted.display()
    );
    drop(c);

    let end = end_line(&agent, &id).await;
    assert_eq!(end["reason"], "idle", "{end}");
    assert_clean(&agent, "after the wipe").await;
    assert_eq!(fs::read_to_string(&victim).ok().as_deref(), Some("victim file: must survive the wipe\n"));
    assert_eq!(fs::read_to_string(vdir.join("dir/keep.txt")).ok().as_deref(), Some("keep me\n"));
    assert_eq!(fs::read_to_string(vdir.join("dir/sub/deep.txt")).ok().as_deref(), Some("deep\n"));
    assert_eq!(fs::read_to_string(&marker).ok().as_deref(), Some("marker\n"));
    assert!(agent.socket().exists(), "the agent's socket was removed");
    assert!(agent.state_dir().join("leases").is_dir(), "the lease dir was removed");
    assert!(Path::new("/etc/passwd").exists());
    // The agent still serves.
    let again = ping(&agent).await;
    assert_ne!(again.token, r.token);
}

// ---------------------------------------------------------------------------
// 9. A daemon that fails to start, or never becomes ready: UNAVAILABLE, nothing left.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_start_failure_is_unavailable_and_leaves_nothing() {
    let unique = format!("fail-start-{}-{}", std::process::id(), rand_tag());
    let agent = agent("core-fail-start", 2, "1s").daemon_arg(&format!("--fail-start={unique}")).start_async().await;
    let t0 = Instant::now();
    let err = try_ping(agent.socket()).await.expect_err("Ping succeeded with a daemon that fails to start");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&unique), "message lacks the daemon's stderr {unique:?}: {err:?}");
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert_clean(&agent, "after the failed start").await;
    assert_eq!(agent.try_exit_status(), None, "agent exited");

    let slow = agent_slow().start_async().await;
    let t0 = Instant::now();
    let err = try_ping(slow.socket()).await.expect_err("Ping succeeded with a daemon that never gets ready");
    let took = t0.elapsed();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let msg = err.message().to_lowercase();
    assert!(
        msg.contains("1s") && ["did not answer", "timed out", "timeout", "not ready"].iter().any(|w| msg.contains(w)),
        "message does not mention the 1s start timeout: {err:?}"
    );
    assert!(took < Duration::from_secs(10), "refusal took {took:?} with --start-timeout 1s");
    assert_clean(&slow, "after the start timeout").await;
}

fn agent_slow() -> AgentBuilder {
    agent("core-slow-start", 2, "1s").arg("--start-timeout").arg("1s").daemon_arg("--start-delay=60000")
}

fn rand_tag() -> String {
    let mut b = [0u8; 6];
    fs::File::open("/dev/urandom").unwrap().read_exact(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------------------
// 10. Agent SIGKILL mid-build, restart: the client is not left hanging, the sweep cleans.

/// Starts a long Stream as a fakeclient and waits until the instance is ready
/// and streaming; returns the client and the instance id.
async fn start_long_stream(agent: &Agent) -> (std::process::Child, String) {
    let mut cmd = fakeclient(agent.socket());
    cmd.args(["--timeout", "120", "stream", "1Gi", "64Ki", "20"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let ready = agent
        .wait_log_async(0, |v| v["message"] == "instance ready", CALL)
        .await
        .unwrap_or_else(|| panic!("instance not ready; agent output:\n{}", agent.log_tail(40)));
    let id = ready["instance"].as_str().expect("instance field on the ready line").to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    (child, id)
}

/// Waits up to `limit` for the client to exit; returns its JSON output.
async fn client_ends_within(mut child: std::process::Child, limit: Duration) -> Value {
    let t0 = Instant::now();
    loop {
        if let Some(_st) = child.try_wait().unwrap() {
            let mut out = String::new();
            child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            return out.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the client still hangs {limit:?} after the agent was killed");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_mid_build_then_restart_sweeps() {
    let agent = agent("core-sigkill", 2, "1s").start_async().await;
    let (child, id) = start_long_stream(&agent).await;
    let inst_dir = agent.state_dir().join("instances").join(&id);
    assert!(inst_dir.is_dir());

    agent.sigkill();
    assert!(agent.wait_exit_async(Duration::from_secs(5)).await.is_some(), "agent survived SIGKILL");
    let out = client_ends_within(child, Duration::from_secs(5)).await;
    assert!(out.get("ok") != Some(&Value::Bool(true)), "the 1Gi stream completed?! {out}");

    let mark = agent.log_mark();
    agent.restart_async().await;
    agent
        .wait_log_async(mark, |v| v["message"] == "start-up sweep done", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no sweep line; output:\n{}", agent.log_tail(40)));
    assert_clean(&agent, "after SIGKILL + restart").await;
    assert!(!inst_dir.exists());
    // The restarted agent serves.
    let r = ping(&agent).await;
    assert!(!r.token.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_shim_sigkill_then_restart_sweep_deletes_the_instance() {
    use nix::sys::signal::Signal;
    let agent = agent("core-sigkill-shim", 2, "1s").start_async().await;
    let (child, id) = start_long_stream(&agent).await;
    let inst_dir = agent.state_dir().join("instances").join(&id);
    let shims = shims_of(agent.dir());
    assert!(!shims.is_empty(), "no berth-shim process names {}", agent.dir().display());
    let agent_pid = agent.pid().unwrap();

    // Freeze them first, so none of them reacts to the others' death, then kill.
    kill(agent_pid, Signal::SIGSTOP);
    for &p in &shims {
        kill(p, Signal::SIGSTOP);
    }
    for &p in &shims {
        kill(p, Signal::SIGKILL);
    }
    kill(agent_pid, Signal::SIGKILL);
    assert!(agent.wait_exit_async(Duration::from_secs(5)).await.is_some(), "agent survived SIGKILL");
    let out = client_ends_within(child, Duration::from_secs(5)).await;
    assert!(out.get("ok") != Some(&Value::Bool(true)), "{out}");
    for &p in &shims {
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{p}")).exists() && proc_argv(p).is_some_and(|a| a.contains("berth-shim")) {
            assert!(t0.elapsed() < Duration::from_secs(5), "shim {p} survived SIGKILL");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // With agent and shim gone, the instance is left for the sweep.
    let before = agent.leak_scan();
    assert!(inst_dir.is_dir(), "instance dir already gone: nothing for the sweep to do ({before:?})");
    assert!(before.iter().any(|l| l.contains("lease file left")), "no lease left before the sweep: {before:?}");

    let mark = agent.log_mark();
    agent.restart_async().await;
    let sweep = agent
        .wait_log_async(mark, |v| v["message"] == "start-up sweep done", Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no sweep line; output:\n{}", agent.log_tail(40)));
    assert!(sweep["instances"].as_u64().is_some_and(|n| n >= 1), "sweep saw no instance: {sweep}");
    assert_eq!(sweep["failures"], 0, "{sweep}");
    assert_clean(&agent, "after agent+shim SIGKILL and the restart's sweep").await;
    assert!(!inst_dir.exists());
    let r = ping(&agent).await;
    assert!(!r.token.is_empty());
}

// ---------------------------------------------------------------------------
// 11. Bad input keeps the agent serving.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_floods_keep_the_agent_serving() {
    let agent = agent("core-garbage", 2, "1s").start_async().await;
    let sock = agent.socket().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut junk = vec![0u8; 64 * 1024];
        fs::File::open("/dev/urandom").unwrap().read_exact(&mut junk).unwrap();
        // Random bytes, then close.
        let mut s = UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(&junk);
        drop(s);
        // Connect and close at once.
        drop(UnixStream::connect(&sock).unwrap());
        // An HTTP/2 preface followed by garbage frames.
        let mut s = UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let _ = s.write_all(&junk[..4096]);
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        drop(s);
        // A flood: 50 connections open at once, some with bytes, all dropped.
        let mut conns = Vec::new();
        for i in 0..50 {
            let mut s = UnixStream::connect(&sock).unwrap_or_else(|e| panic!("flood connection {i}: {e}"));
            if i % 3 == 0 {
                let _ = s.write_all(&junk[i * 100..i * 100 + 100]);
            }
            conns.push(s);
        }
        drop(conns);
        // And 50 more, each dropped at once.
        for _ in 0..50 {
            drop(UnixStream::connect(&sock).unwrap());
        }
    })
    .await
    .unwrap();

    assert_eq!(agent.try_exit_status(), None, "the agent exited on bad input:\n{}", agent.log_tail(40));
    let r = ping(&agent).await;
    assert!(!r.token.is_empty());
    // A second client too.
    let b = fc_ok(&agent, 1000, &["ping"]).await;
    assert_ne!(b["token"], r.token.as_str());
    assert_eq!(agent.try_exit_status(), None);
    end_line(&agent, &instance_id_of_root(&agent, &r.root)).await;
    end_line(&agent, &instance_id_of_root(&agent, b["root"].as_str().unwrap())).await;
    assert_clean(&agent, "after the garbage, the flood and the idle end").await;
    // Bad bytes end connections, not instances: every instance ended idle.
    let ends = agent.instance_ends();
    assert!(ends.iter().all(|v| v["reason"] == "idle"), "{ends:?}");
}

// ---------------------------------------------------------------------------
// 12. Config errors exit non-zero and name the flag.

/// Runs `berth-agent run` with a complete, valid command line plus `bad`
/// (which may override a default by name); returns (exit success, stderr).
fn run_agent_config(name: &str, bad: &[&str]) -> (bool, String) {
    let tmp = tempfile::Builder::new().prefix("berth-cfg-").tempdir().unwrap();
    // 0755 like the harness's dirs: only the bad flag may be wrong.
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    let cgroup_parent = format!("berth-test/{name}-{}", std::process::id());
    let mut defaults: Vec<(String, String)> = vec![
        ("--listen".into(), format!("unix://{}/berth.sock", dir.display())),
        ("--state-dir".into(), dir.join("state").display().to_string()),
        ("--cgroup-parent".into(), cgroup_parent.clone()),
        ("--idmap-base".into(), harness::random_idmap_base(524288).to_string()),
        ("--idmap-count".into(), "524288".into()),
        ("--daemon".into(), harness::bin_path("fakekitd").display().to_string()),
        ("--shim".into(), harness::bin_path("berth-shim").display().to_string()),
        ("--max-builds".into(), "1".into()),
        ("--http-addr".into(), "127.0.0.1:0".into()),
    ];
    let mut args: Vec<String> = vec!["run".into()];
    let mut bad_it = bad.chunks(2);
    let bad_pairs: Vec<(&str, &str)> = bad_it.by_ref().map(|c| (c[0], c[1])).collect();
    defaults.retain(|(k, _)| !bad_pairs.iter().any(|(b, _)| b == k));
    for (k, v) in defaults {
        args.push(k);
        args.push(v);
    }
    for (k, v) in &bad_pairs {
        args.push(k.to_string());
        args.push(v.to_string());
    }
    let mut cmd = Command::new(harness::bin_path("berth-agent"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BERTH_") {
            cmd.env_remove(&k);
        }
    }
    let mut child = cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    harness::cleanup(&LeakScope {
        dir: dir.clone(),
        state_dir: dir.join("state"),
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        cgroup_parent,
    });
    eprintln!("berth-agent {bad:?}: exit {status:?}, stderr:\n{stderr}");
    match status {
        Some(st) => (st.success(), stderr),
        None => panic!("berth-agent run {args:?} did not exit within 10s (accepted the bad config); stderr:\n{stderr}"),
    }
}

#[test]
fn config_errors_exit_nonzero_naming_the_flag() {
    let (ok, err) = run_agent_config("cfg-mem", &["--build-memory", "4GB"]);
    assert!(!ok, "--build-memory 4GB accepted; stderr:\n{err}");
    assert!(err.contains("--build-memory"), "stderr does not name --build-memory:\n{err}");

    let (ok, err) = run_agent_config("cfg-daemon", &["--daemon", "/nonexistent"]);
    assert!(!ok, "--daemon /nonexistent accepted; stderr:\n{err}");
    assert!(
        err.contains("/nonexistent") && err.to_lowercase().contains("not found"),
        "stderr does not say the daemon /nonexistent was not found:\n{err}"
    );

    // Highest host id here: 1000 (cloudsdk), 0 (root) anywhere.
    let (ok, err) = run_agent_config("cfg-idmap", &["--idmap-base", "0"]);
    assert!(!ok, "--idmap-base 0 (overlapping root and every host user) accepted; stderr:\n{err}");
    assert!(err.contains("--idmap-base"), "stderr does not name --idmap-base:\n{err}");
    assert!(
        err.contains("puts a host id in the pool") && err.contains("\"root\""),
        "stderr does not say which host id is in the pool:\n{err}"
    );
}
