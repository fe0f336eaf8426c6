//! [`Sibling`]: a second agent process on the same dirs and sockets, as a
//! DaemonSet rollout with `maxSurge: 1` starts one beside the old.

use super::*;

/// A second agent process on the same dirs and sockets as an [`Agent`], as a
/// DaemonSet rollout with `maxSurge: 1` starts one beside the old.
pub struct Sibling {
    pub(crate) child: Mutex<Child>,
    pub(crate) logs: Arc<LogBuf>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Agent {
    /// Starts another `berth-agent` with this agent's exact command line;
    /// it logs into its own buffer.
    pub fn spawn_sibling(&self) -> Sibling {
        let mut cmd = self.command();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", self.exe.display()));
        let pid = child.id();
        let logs = LogBuf::new();
        let readers = vec![
            logs.capture(child.stdout.take().unwrap(), format!("sibling[{pid}] stdout:"), true),
            logs.capture(child.stderr.take().unwrap(), format!("sibling[{pid}]:"), true),
        ];
        Sibling { child: Mutex::new(child), logs, readers }
    }
}

impl Sibling {
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }
    pub fn sigterm(&self) {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), nix::sys::signal::Signal::SIGTERM);
    }
    pub fn wait_log(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        self.logs.wait_blocking(0, &pred, timeout)
    }
    pub fn logs(&self) -> Vec<Value> {
        self.logs.values(0)
    }
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let st = poll(timeout, Duration::from_millis(20), || self.child.lock().unwrap().try_wait().ok().flatten());
        if st.is_some() {
            super::logs::drain(&self.readers);
        }
        st
    }
}

impl Drop for Sibling {
    fn drop(&mut self) {
        let mut c = self.child.lock().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }
}
