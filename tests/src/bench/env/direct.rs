//! [`Direct`]: a fakekitd started directly, without the agent: the
//! baselines.

use super::*;

/// A fakekitd run as a plain child of the bench: no namespaces, no cgroup.
pub struct Direct {
    pub(crate) child: tokio::process::Child,
    pub(crate) live_pid: Arc<AtomicU32>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub(crate) _stderr: Option<tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>>,
    /// When its "serving on" line was read.
    pub serving_at: Instant,
    pub(crate) _undo: UndoGuard,
}

impl Direct {
    /// Spawns fakekitd serving on `<dir>/buildkitd.sock` with `--root
    /// <dir>/root` and waits for its "serving on" line (it prints it once
    /// its socket listens), so no polling delay is added to the baseline.
    pub async fn spawn(fakekitd: &Path, dir: PathBuf) -> Result<Direct> {
        use tokio::io::AsyncBufReadExt;
        fs::create_dir_all(&dir)?;
        let socket = dir.join("buildkitd.sock");
        let mut child = tokio::process::Command::new(fakekitd)
            .arg("--addr")
            .arg(format!("unix://{}", socket.display()))
            .arg("--root")
            .arg(dir.join("root"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", fakekitd.display()))?;
        let live_pid = Arc::new(AtomicU32::new(child.id().unwrap_or(0)));
        let undo = register(Undo::Pid(live_pid.clone()));
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(l))) if l.contains("serving on") => break,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => bail!("fakekitd exited before serving"),
                Err(_) => bail!("fakekitd did not serve within {CALL_TIMEOUT:?}"),
            }
        }
        let serving_at = Instant::now();
        Ok(Direct { child, live_pid, dir, socket, _stderr: Some(lines), serving_at, _undo: undo })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, reap, remove its dir.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        // Killed: from here the undo registry must not signal the pid,
        // which is free for reuse once reaped.
        self.live_pid.store(0, Ordering::SeqCst);
        let _ = self.child.wait().await;
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A direct start: spawn fakekitd in `dir`, connect, Ping; clock from spawn.
pub async fn direct_start(fakekitd: &Path, dir: PathBuf) -> Result<(StartSample, Direct)> {
    let t0 = Instant::now();
    let d = Direct::spawn(fakekitd, dir).await?;
    let (mut s, _reply, conn) = timed_ping(&d.socket, t0).await?;
    s.bound_ms = Some(d.serving_at.duration_since(t0).as_secs_f64() * 1e3);
    drop(conn);
    Ok((s, d))
}

/// The instance id of a daemon from its `--root` (`<state>/instances/<id>/root`).
pub fn instance_id_of(reply: &PingReply) -> Option<String> {
    Path::new(&reply.root).parent()?.file_name().map(|s| s.to_string_lossy().into_owned())
}

/// The first host uid of a `uid_map` ("0 <host> <count>").
pub fn host_base(map: &str) -> Option<u32> {
    map.split_whitespace().nth(1)?.parse().ok()
}
