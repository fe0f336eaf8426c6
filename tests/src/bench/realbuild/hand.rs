//! The baseline daemon of figure 12's start row: the real buildkitd started
//! by hand, rootless as berth runs it (new user, mount and pid namespaces,
//! 65536 ids mapped `0 BASE 65536`, root inside, a private tmpfs on `/run`
//! for runc's state), without the agent, the shim, a cgroup or a network
//! namespace. util-linux does the namespaces (`unshare`, `nsenter`): host
//! root writes the id maps of a holder process whose user namespace the
//! daemon then joins, so neither newuidmap nor /etc/subuid is needed. The
//! daemon announces readiness with sd_notify `READY=1` on a datagram socket
//! of the bench, so the wait adds no polling delay.

use crate::bench::env::{self, Undo, UndoGuard};
use crate::harness;
use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::{Gid, Uid};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a hand-started daemon may take to send READY=1.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A running hand-started buildkitd. Dropping it SIGKILLs it (the undo
/// guards); [`Hand::stop`] also reaps it and removes its dir.
pub struct Hand {
    /// `unshare --pid --fork --kill-child`: killing it kills the daemon.
    outer: tokio::process::Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
    /// Spawn -> READY=1.
    pub ready_secs: f64,
    /// The outer pid for the undo registry; 0 once reaped.
    live: Arc<AtomicU32>,
    _undo: UndoGuard,
}

impl Hand {
    /// Starts buildkitd in `dir` (created, owned by host uid `base`), with
    /// `t0` taken by the caller just before this call; returns once the
    /// daemon sent READY=1.
    pub async fn start(buildkitd: &Path, dir: PathBuf, base: u32, t0: Instant) -> Result<Hand> {
        let run = dir.join("run");
        let root = dir.join("root");
        for d in [&dir, &run, &root] {
            fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
            nix::unistd::chown(d.as_path(), Some(Uid::from_raw(base)), Some(Gid::from_raw(base)))
                .with_context(|| format!("chown {}", d.display()))?;
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))?;
        // The notify socket lives outside the daemon's dir (its /run is a
        // tmpfs of its own), in a root-owned dir it may write to.
        let nd = dir.with_extension("notify");
        fs::create_dir_all(&nd)?;
        fs::set_permissions(&nd, fs::Permissions::from_mode(0o755))?;
        let notify_path = nd.join("notify.sock");
        let _ = fs::remove_file(&notify_path);
        let notify = tokio::net::UnixDatagram::bind(&notify_path).with_context(|| notify_path.display().to_string())?;
        fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o666))?;

        // The holder: a user namespace whose maps host root writes.
        let mut holder = tokio::process::Command::new("unshare")
            .args(["--user", "sleep", "infinity"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawn unshare --user (util-linux)")?;
        let hpid = holder.id().ok_or_else(|| anyhow!("holder exited"))?;
        let hlive = Arc::new(AtomicU32::new(hpid));
        let _hundo = env::register(Undo::Pid(hlive.clone()));
        let own = fs::read_link("/proc/self/ns/user")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read_link(format!("/proc/{hpid}/ns/user")).ok().as_ref() == Some(&own) {
            if Instant::now() > deadline {
                bail!("unshare --user did not enter a new user namespace");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        for f in ["uid_map", "gid_map"] {
            fs::write(format!("/proc/{hpid}/{f}"), format!("0 {base} 65536\n"))
                .with_context(|| format!("write /proc/{hpid}/{f}"))?;
        }
        let socket = run.join("buildkitd.sock");
        let script = "mount -t tmpfs -o mode=755 tmpfs /run && exec \"$@\"";
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.arg(format!("--user=/proc/{hpid}/ns/user"))
            .args(["--setuid", "0", "--setgid", "0", "--", "unshare", "--mount", "--pid", "--fork", "--kill-child"])
            .args(["--mount-proc", "sh", "-c", script, "sh"])
            .arg(buildkitd)
            .arg("--addr")
            .arg(format!("unix://{}", socket.display()))
            .arg("--root")
            .arg(&root)
            .arg("--otel-socket-path")
            .arg(run.join("otel-grpc.sock"))
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", &dir)
            .env("XDG_RUNTIME_DIR", &run)
            .env("USER", "root")
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.with_extension("log"))?)
            .kill_on_drop(true);
        let mut outer = cmd.spawn().context("spawn nsenter (util-linux)")?;
        let live = Arc::new(AtomicU32::new(outer.id().unwrap_or(0)));
        let undo = env::register(Undo::Pid(live.clone()));
        let deadline = tokio::time::Instant::from_std(t0 + READY_TIMEOUT);
        let ready = loop {
            let recv = async {
                let mut buf = [0u8; 512];
                let n = notify.recv(&mut buf).await?;
                Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
            };
            tokio::select! {
                r = tokio::time::timeout_at(deadline, recv) => match r {
                    // sd_notify sends `READY=1`, maybe among other lines.
                    Ok(Ok(msg)) if msg.lines().any(|l| l == "READY=1") => break t0.elapsed(),
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => bail!("notify socket {}: {e}", notify_path.display()),
                    Err(_) => bail!("hand-started buildkitd sent no READY=1 within {READY_TIMEOUT:?}; log:\n{}", log_tail(&dir)),
                },
                st = outer.wait() => bail!("hand-started buildkitd exited ({st:?}) before READY=1; log:\n{}", log_tail(&dir)),
            }
        };
        // The daemon holds its user namespace now; the holder goes.
        let _ = holder.start_kill();
        let _ = holder.wait().await;
        hlive.store(0, std::sync::atomic::Ordering::SeqCst);
        let _ = fs::remove_dir_all(&nd);
        Ok(Hand { outer, socket, dir, ready_secs: ready.as_secs_f64(), live, _undo: undo })
    }

    /// SIGKILL (the daemon dies with its pid namespace), reap, remove its
    /// state and log.
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.outer.start_kill();
        let _ = self.outer.wait().await;
        self.live.store(0, std::sync::atomic::Ordering::SeqCst);
        // Mounts lived in its own mount namespace and are gone with it.
        let mut last = Ok(());
        for _ in 0..50 {
            last = fs::remove_dir_all(&self.dir);
            if last.is_ok() || !self.dir.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = fs::remove_file(self.dir.with_extension("log"));
        last.with_context(|| format!("remove {}", self.dir.display()))
    }
}

fn log_tail(dir: &Path) -> String {
    let log = fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
    super::buildctl::tail(&log, 20)
}

/// An id range of 65536 for a hand-started daemon, clear of the agents'.
pub fn id_base() -> u32 {
    harness::random_idmap_base(65536)
}
