//! The node shapes clusters run on cgroup v2, for real: the agent in the
//! root cgroup, as a systemd service (`system.slice/<agent>.service`), and
//! as a privileged pod (`kubepods/<pod>/<container>`, entered through pid,
//! mount and, as one variant, cgroup namespaces). In each: the agent moves
//! nothing but itself, instances get their limits, and on exit its cgroup is
//! as the supervisor left it, so a restart in the same cgroup works. A
//! process in the way gives an EBUSY explained in plain words.
//!
//! These need a cgroup v2 host, where they run as root: the VM lane
//! (tests/vm/run.sh) runs them. On a v1 host each says SKIPPED and why.
//! The agents here are started by hand, not through the harness's `Agent`,
//! which always passes `--cgroup-parent`: here the agent places itself.

use berth_tests::harness::{
    bin_path, leak_scan, poll, random_idmap_base, run_fakeclient, LeakScope, DEFAULT_IDMAP_COUNT,
};
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CG: &str = "/sys/fs/cgroup";
/// Bounds for waits that succeed in seconds natively; the VM lane emulates
/// its CPU on a shared host, so they are wide.
const WAIT: Duration = Duration::from_secs(180);

fn v2_or_skip(test: &str) -> bool {
    if Path::new(CG).join("cgroup.controllers").exists() {
        return true;
    }
    eprintln!(
        "SKIPPED: {test}: needs a cgroup v2 host (this one is v1); the cgroup v2 VM lane runs it (tests/vm/run.sh, part of the suite where qemu is installed)"
    );
    false
}

fn tag() -> String {
    format!("{}-{:04x}", std::process::id(), random_idmap_base(DEFAULT_IDMAP_COUNT) % 0xffff)
}

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p.as_ref()).unwrap_or_default().trim().to_string()
}

/// The v2 cgroup of every process: what "nothing else moved" compares.
fn all_cgroups() -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
            let c = read(e.path().join("cgroup"));
            if let Some(path) = c.lines().find_map(|l| l.strip_prefix("0::")) {
                out.insert(pid, path.to_string());
            }
        }
    }
    out
}

/// Processes (still alive) whose cgroup differs between two snapshots.
fn moved(before: &BTreeMap<u32, String>, except: &[u32]) -> Vec<String> {
    let now = all_cgroups();
    before
        .iter()
        .filter(|(pid, _)| !except.contains(pid))
        .filter_map(|(pid, was)| {
            let is = now.get(pid)?;
            (is != was).then(|| format!("pid {pid} ({}) moved from {was} to {is}", read(format!("/proc/{pid}/comm"))))
        })
        .collect()
}

/// A cgroup's subtree as `(relative path, cgroup.procs, subtree_control)`.
fn tree(dir: &Path) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<(String, String, String)>) {
        let rel = d.strip_prefix(base).unwrap().display().to_string();
        // An instance's cgroup can go between listing its parent and
        // reading it (the reap runs beside the walk): a cgroup that is gone
        // is not part of the tree.
        let entries = match fs::read_dir(d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d != base => return,
            Err(e) => panic!("{}: {e}", d.display()),
        };
        out.push((rel, read(d.join("cgroup.procs")), read(d.join("cgroup.subtree_control"))));
        let mut subs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
        subs.sort();
        for s in subs {
            walk(base, &s, out);
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// A cgroup the test makes (with `+memory +cpu +pids` passed on where
/// `delegate`), removed at the end with whatever is below it.
struct Cgroup {
    path: PathBuf,
    made: Vec<PathBuf>,
}

impl Cgroup {
    /// `rel` below the root; each new dir on the way passes the controllers
    /// on, as systemd (Delegate=yes) and kubelet do for their slices.
    fn make(rel: &str) -> Cgroup {
        let mut path = PathBuf::from(CG);
        let mut made = Vec::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            path.push(part);
            if !path.exists() {
                fs::create_dir(&path).unwrap();
                made.push(path.clone());
            }
            if i + 1 < parts.len() {
                fs::write(path.join("cgroup.subtree_control"), "+memory +cpu +pids").unwrap();
            }
        }
        Cgroup { path, made }
    }
    fn procs(&self) -> Vec<u32> {
        read(self.path.join("cgroup.procs")).lines().filter_map(|l| l.parse().ok()).collect()
    }
    /// A `sleep` placed in this cgroup: a process the agent did not start
    /// (an exec session, a wrapper), in the host's pid namespace.
    fn sleeper(&self) -> Child {
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {}/cgroup.procs && exec sleep 600", self.path.display()))
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(poll(WAIT, Duration::from_millis(20), || self.procs().contains(&pid).then_some(())).is_some());
        child
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for d in self.made.iter().rev() {
            for sub in fs::read_dir(d).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or(Vec::<PathBuf>::new())
            {
                if sub.is_dir() {
                    let _ = fs::remove_dir(&sub);
                }
            }
            let _ = fs::remove_dir(d);
        }
    }
}

/// How the agent is started: where, and through which namespaces.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// From the test's own cgroup (the root, in the VM).
    Here,
    /// Moved into the cgroup first, as systemd starts a service.
    Service,
    /// Moved into the cgroup, then new pid and mount namespaces (and a
    /// cgroup namespace with a fresh cgroup2 mount, when `true`), as
    /// containerd starts a privileged pod's container.
    Pod { cgroupns: bool },
}

struct Node {
    dir: tempfile::TempDir,
    socket: PathBuf,
    state: PathBuf,
    idmap_base: u32,
}

struct Running {
    child: Child,
    /// The agent's pid in the host's pid namespace.
    pid: u32,
    out: Arc<Mutex<String>>,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::Builder::new().prefix("berth-shape-").tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path().canonicalize().unwrap();
        Node {
            socket: d.join("berth.sock"),
            state: d.join("state"),
            idmap_base: random_idmap_base(DEFAULT_IDMAP_COUNT),
            dir,
        }
    }

    fn agent_argv(&self) -> Vec<String> {
        vec![
            bin_path("berth-agent").display().to_string(),
            "run".into(),
            "--listen".into(),
            format!("unix://{}", self.socket.display()),
            "--state-dir".into(),
            self.state.display().to_string(),
            "--idmap-base".into(),
            self.idmap_base.to_string(),
            "--idmap-count".into(),
            DEFAULT_IDMAP_COUNT.to_string(),
            "--daemon".into(),
            bin_path("fakekitd").display().to_string(),
            "--shim".into(),
            bin_path("berth-shim").display().to_string(),
            "--log-format".into(),
            "json".into(),
            "--idle-timeout".into(),
            "60s".into(),
            // Generous under emulation; SIGTERM ends the instance after 1 s
            // instead of waiting out its idle timeout.
            "--start-timeout".into(),
            "120s".into(),
            "--drain-timeout".into(),
            "1s".into(),
            "--http-addr".into(),
            "127.0.0.1:0".into(),
        ]
    }

    fn command(&self, shape: Shape, cg: Option<&Cgroup>) -> Command {
        let argv = self.agent_argv();
        let cg_dir = cg.map(|c| c.path.display().to_string()).unwrap_or_default();
        let mut cmd = match shape {
            Shape::Here | Shape::Service => {
                let enter = cg.map(|_| "echo $$ > \"$0/cgroup.procs\" || exit 97; ").unwrap_or_default();
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("{enter}shift; exec \"$@\"")).arg(&cg_dir).arg("-");
                c
            }
            Shape::Pod { cgroupns } => {
                // The container's init joins its cgroup from inside the new
                // pid namespace (as pid 1), so nothing of the runtime stays
                // in the container's cgroup; then, for the cgroupns variant,
                // a cgroup namespace rooted there with a fresh cgroup2 mount.
                let pod = self.dir.path().join("pod.sh");
                fs::write(
                    &pod,
                    "cg=$1 ns=$2; shift 2\n\
                     echo $$ > \"$cg/cgroup.procs\" || exit 97\n\
                     if [ \"$ns\" = 1 ]; then\n\
                     \x20 exec unshare --cgroup sh -c 'umount -l /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$@\"' ctr \"$@\"\n\
                     fi\n\
                     exec \"$@\"\n",
                )
                .unwrap();
                let mut c = Command::new("unshare");
                c.args(["--pid", "--fork", "--mount", "--mount-proc", "sh"]).arg(&pod).arg(&cg_dir).arg(if cgroupns {
                    "1"
                } else {
                    "0"
                });
                c
            }
        };
        cmd.args(argv).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        cmd
    }

    /// Starts the agent; returns once its socket listens, or with its
    /// exit status and output if it ends first.
    fn start(&self, shape: Shape, cg: Option<&Cgroup>) -> Result<Running, (ExitStatus, String)> {
        let mut child = self.command(shape, cg).spawn().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let o = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let ready = poll(WAIT, Duration::from_millis(25), || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(st));
            }
            berth_tests::harness::socket_listening(&self.socket).then_some(Ok(()))
        });
        match ready {
            Some(Ok(())) => {}
            Some(Err(st)) => {
                std::thread::sleep(Duration::from_millis(200));
                let text = out.lock().unwrap().clone();
                return Err((st, text));
            }
            None => panic!("agent did not listen within {WAIT:?}: {}", out.lock().unwrap()),
        }
        // In a pod the agent is unshare's child; elsewhere the shell exec'd it.
        let pid = match shape {
            Shape::Pod { .. } => {
                let p = child.id();
                poll(WAIT, Duration::from_millis(20), || {
                    read(format!("/proc/{p}/task/{p}/children")).split_whitespace().next()?.parse().ok()
                })
                .expect("unshare's child")
            }
            _ => child.id(),
        };
        assert_eq!(read(format!("/proc/{pid}/comm")), "berth-agent");
        Ok(Running { child, pid, out })
    }

    fn scope(&self, parent: &str) -> LeakScope {
        LeakScope {
            dir: self.dir.path().canonicalize().unwrap(),
            state_dir: self.state.clone(),
            cgroup_root: PathBuf::from(CG),
            cgroup_parent: parent.to_string(),
        }
    }
}

/// A test that fails midway must not leave its agent running (the VM
/// lane's leak check would report it, hiding the first failure).
impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    fn cgroup(&self) -> String {
        read(format!("/proc/{}/cgroup", self.pid)).lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("").to_string()
    }
    /// SIGTERM, then the exit status (the agent drains: no clients left).
    fn stop(mut self) -> (ExitStatus, String) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        let st = poll(WAIT, Duration::from_millis(20), || self.child.try_wait().ok().flatten())
            .unwrap_or_else(|| panic!("agent did not exit on SIGTERM: {}", self.out.lock().unwrap()));
        std::thread::sleep(Duration::from_millis(100));
        let out = self.out.lock().unwrap().clone();
        (st, out)
    }
}

/// A ping through the agent: a fresh instance answers. Returns the
/// instance's cgroup dirs found under `parent` while it lives.
fn ping_and_find_instance(node: &Node, parent: &Path) -> Vec<PathBuf> {
    let r = run_fakeclient(&node.socket, &["ping"]);
    assert!(r.ok(), "ping: {r:?}");
    let dirs: Vec<PathBuf> = fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().unwrap().to_string_lossy().starts_with("berth-"))
        .collect();
    assert_eq!(dirs.len(), 1, "one instance cgroup under {}: {dirs:?}", parent.display());
    let d = &dirs[0];
    assert_ne!(read(d.join("memory.max")), "max", "memory limit set in {}", d.display());
    assert_ne!(read(d.join("pids.max")), "max", "pids limit set in {}", d.display());
    dirs
}

#[test]
fn in_the_root_cgroup_the_agent_moves_nothing_and_instances_go_under_berth() {
    if !v2_or_skip("root cgroup") {
        return;
    }
    if read("/proc/self/cgroup") != "0::/" {
        eprintln!("SKIPPED: root cgroup: this test process is not in the root cgroup (the VM lane runs it there)");
        return;
    }
    let root = Path::new(CG);
    let subtree = read(root.join("cgroup.subtree_control"));
    let before = all_cgroups();
    let node = Node::new();
    let agent = node.start(Shape::Here, None).unwrap_or_else(|(st, out)| panic!("agent exited {st}: {out}"));
    assert_eq!(agent.cgroup(), "/", "the agent stays in the root cgroup");
    ping_and_find_instance(&node, &root.join("berth"));
    let moved_now = moved(&before, &[]);
    assert!(moved_now.is_empty(), "no process moved: {moved_now:?}");
    let (st, out) = agent.stop();
    assert!(st.success(), "{st}: {out}");
    // /berth stays for the next agent (a surge rollout's sibling), empty.
    assert_eq!(tree(&root.join("berth")), vec![(String::new(), String::new(), "cpu memory pids".into())]);
    assert_eq!(read(root.join("cgroup.subtree_control")), subtree);
    let moved_after = moved(&before, &[]);
    assert!(moved_after.is_empty(), "no process moved: {moved_after:?}");
    let leaks = leak_scan(&node.scope("berth"), &[]);
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[test]
fn as_a_systemd_service_only_the_agent_moves_and_a_restart_works() {
    if !v2_or_skip("systemd service") {
        return;
    }
    let t = tag();
    let svc = Cgroup::make(&format!("system.slice/berth-{t}.service"));
    let rel = svc.path.strip_prefix(CG).unwrap().display().to_string();
    let empty = tree(&svc.path);
    let before = all_cgroups();
    let node = Node::new();
    for round in 0..2 {
        // Round 1 is the supervisor's restart in the same cgroup: it works
        // only if the first agent left no controllers enabled there.
        let agent = node
            .start(Shape::Service, Some(&svc))
            .unwrap_or_else(|(st, out)| panic!("round {round}: agent exited {st}: {out}"));
        assert_eq!(agent.cgroup(), format!("/{rel}/agent"), "the agent moved itself into its leaf");
        assert!(svc.procs().is_empty());
        ping_and_find_instance(&node, &svc.path);
        let m = moved(&before, &[agent.pid]);
        assert!(m.is_empty(), "no process but the agent moved: {m:?}");
        let (st, out) = agent.stop();
        assert!(st.success(), "round {round}: {st}: {out}");
        assert_eq!(tree(&svc.path), empty, "round {round}: the service cgroup is as systemd left it");
        let leaks = leak_scan(&node.scope(&rel), &[]);
        assert!(leaks.is_empty(), "{leaks:?}");
    }

    // Another process in the service's cgroup: the agent cannot enable the
    // controllers there, says why and how to fix it, and moves nothing.
    let mut other = svc.sleeper();
    let with_other = tree(&svc.path);
    let (st, out) = node.start(Shape::Service, Some(&svc)).err().expect("the agent refuses to start");
    assert!(!st.success());
    let pid = other.id();
    for want in [
        "Device or resource busy",
        &format!("{rel}/cgroup.subtree_control"),
        &format!("pid {pid} (sleep)"),
        "--cgroup-parent",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
    assert_eq!(tree(&svc.path), with_other, "nothing moved, nothing created");
    let _ = other.kill();
    let _ = other.wait();
}

fn privileged_pod(cgroupns: bool) {
    let t = tag();
    let ctr = Cgroup::make(&format!("kubepods/pod{t}/ctr"));
    let rel = ctr.path.strip_prefix(CG).unwrap().display().to_string();
    let empty = tree(&ctr.path);
    let before = all_cgroups();
    let node = Node::new();
    let shape = Shape::Pod { cgroupns };
    let agent = node.start(shape, Some(&ctr)).unwrap_or_else(|(st, out)| panic!("agent exited {st}: {out}"));
    assert_eq!(agent.cgroup(), format!("/{rel}/agent"), "the agent moved itself into its leaf");
    ping_and_find_instance(&node, &ctr.path);
    let m = moved(&before, &[agent.pid]);
    assert!(m.is_empty(), "no process but the agent moved: {m:?}");

    // `kubectl exec <pod> -- berth-agent check`: joins the live agent's
    // cgroup and namespaces; it must leave the tree as it was. The ping's
    // client is not visible from the agent's pid namespace, so its instance
    // ends with its connection: compare once that end has settled.
    let settled = Instant::now() + Duration::from_secs(60);
    let busy = |t: Vec<(String, String, String)>| {
        t.iter().any(|(name, procs, _)| name.starts_with("berth-") || (name == "agent" && procs.contains('\n')))
    };
    while busy(tree(&ctr.path)) && Instant::now() < settled {
        std::thread::sleep(Duration::from_millis(100));
    }
    let live = tree(&ctr.path);
    let mut exec = Command::new("sh");
    exec.arg("-c")
        .arg(format!(
            "echo $$ > {}/agent/cgroup.procs && exec nsenter -t {} -p -m {} \"$@\"",
            ctr.path.display(),
            agent.pid,
            if cgroupns { "-C" } else { "" }
        ))
        .arg("exec")
        .arg(bin_path("berth-agent"))
        .args(["check", "--daemon"])
        .arg(bin_path("fakekitd"))
        .arg("--shim")
        .arg(bin_path("berth-shim"))
        .arg("--state-dir")
        .arg(&node.state);
    let out = exec.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("cgroups")).unwrap_or_default().to_string();
    assert!(line.starts_with("ok"), "check's cgroups line beside a live agent: {line}\n{text}");
    assert_eq!(tree(&ctr.path), live, "check beside the live agent changed nothing:\n{text}");
    assert_eq!(agent.cgroup(), format!("/{rel}/agent"), "the live agent was not moved");

    let pid = agent.pid;
    let (st, out) = agent.stop();
    assert!(st.success(), "{st}: {out}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(tree(&ctr.path), empty, "the container's cgroup is as containerd left it");
    let leaks = leak_scan(&node.scope(&rel), &[]);
    assert!(leaks.is_empty(), "{leaks:?}");

    // An exec session started before the agent, from outside its pid
    // namespace: EBUSY, explained.
    let mut session = ctr.sleeper();
    let with_session = tree(&ctr.path);
    let (st, out) = node.start(shape, Some(&ctr)).err().expect("the agent refuses to start");
    assert!(!st.success());
    for want in ["Device or resource busy", "a process outside the agent's pid namespace", "--cgroup-parent"] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
    assert_eq!(tree(&ctr.path), with_session, "nothing moved, nothing created");
    let _ = session.kill();
    let _ = session.wait();
}

#[test]
fn as_a_privileged_pod_in_its_own_pid_namespace() {
    if v2_or_skip("privileged pod") {
        privileged_pod(false);
    }
}

#[test]
fn as_a_privileged_pod_with_a_cgroup_namespace() {
    if v2_or_skip("privileged pod with cgroupns") {
        privileged_pod(true);
    }
}
