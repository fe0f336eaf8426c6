//! A pod's network for the tests and the bench: a thread in a network
//! namespace of its own (as a CI pod's processes are, without
//! `hostNetwork`), running its own single-threaded tokio runtime, so every
//! socket a client makes there lives in that namespace. The kernel puts the
//! daemon's accepted end of such a client's unix connection there too, which
//! is what the handoff path's connection count must find.
//!
//! The namespace is anonymous (`unshare(CLONE_NEWNET)` on the thread):
//! nothing global is named, and it ends with the thread and the last socket
//! made in it. No address is configured in it; only unix sockets are used.

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::pin::Pin;
use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// The pod's thread; dropping it ends the tasks still running there.
pub struct PodNet {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The namespace's nsfs inode, for messages.
    pub netns: u64,
}

impl PodNet {
    /// Starts the thread in a fresh network namespace (needs root).
    pub fn new() -> PodNet {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pod-netns".into())
            .spawn(move || {
                if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(format!("unshare(CLONE_NEWNET): {e} (run as root)")));
                    return;
                }
                let ino = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()).unwrap_or(0);
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                let _ = ready_tx.send(Ok(ino));
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    while let Some(job) = rx.recv().await {
                        tokio::task::spawn_local(job());
                    }
                });
            })
            .expect("spawn the pod's thread");
        let netns = ready_rx.recv().expect("the pod's thread started").unwrap_or_else(|e| panic!("{e}"));
        PodNet { jobs: Some(tx), thread: Some(thread), netns }
    }

    /// Runs `f`'s future on the pod's thread (in its namespace); the
    /// receiver gets its output.
    pub fn spawn<F, Fut, T>(&self, f: F) -> oneshot::Receiver<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            Box::pin(async move {
                let _ = tx.send(f().await);
            })
        });
        self.jobs.as_ref().expect("pod thread").send(job).expect("the pod's thread is running");
        rx
    }
}

impl Default for PodNet {
    fn default() -> Self {
        PodNet::new()
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Inodes of the unix sockets named `path` (bound, or accepted from a
/// listener bound there) in the CALLING THREAD's network namespace.
pub fn socket_inodes_named(path: &std::path::Path) -> std::collections::HashSet<u64> {
    let name = path.display().to_string();
    std::fs::read_to_string("/proc/thread-self/net/unix")
        .expect("read /proc/thread-self/net/unix")
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[7] == name).then(|| f[6].parse().ok()).flatten()
        })
        .collect()
}

/// Inodes of the netlink sockets in the CALLING THREAD's network namespace
/// (whoever holds them: the agent's sock_diag sockets show up here).
pub fn netlink_inodes() -> std::collections::HashSet<u64> {
    std::fs::read_to_string("/proc/thread-self/net/netlink")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(9)?.parse().ok())
        .collect()
}
