//! The agent's few spare disk images (see `berth_shim::disk::spare`):
//! copied from the template, bound to a loop device and mounted (detached)
//! by a background thread, so that an instance's start only renames and
//! attaches one. Kept
//! full to [`WANT`]; a start that finds none makes its image inline, as
//! without spares, and the pool refills behind it.
//!
//! Acquire and release: the pool makes them (one thread at a time), an
//! instance's `spawn::prepare` takes one (from then on it is that
//! instance's image, released by its teardown), and [`Spares::close`] drops
//! the rest when the agent ends. An agent that dies holds their devices
//! and detached mounts only through its fds (the kernel unmounts and
//! unbinds them); their files are swept at the next start (`recover`).
#![forbid(unsafe_code)]

use berth_shim::disk::spare::{self, Spare};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::{debug, info, warn};

/// Spares kept ready. Two covers back-to-back starts (each start takes one
/// and the refill, a few ms, runs beside the daemon's boot); a burst past
/// it makes its images inline. Each costs ~4 MiB of the state dir and one
/// loop device.
pub const WANT: usize = 2;

pub struct Spares {
    dir: PathBuf,
    templates: PathBuf,
    size: u64,
    ready: Mutex<Vec<Spare>>,
    filling: AtomicBool,
    closed: AtomicBool,
    /// "disk spares ready" is logged once, when the pool is first full.
    announced: AtomicBool,
    /// A spare the kernel would not mount ahead is logged once.
    told_unmounted: AtomicBool,
    seq: AtomicU64,
}

impl Spares {
    /// The pool of agent `owner`, for images of `size` bytes; None without
    /// a disk limit. Starts filling at once.
    pub fn start(state: &std::path::Path, owner: &str, size: u64) -> Option<Arc<Spares>> {
        if size == 0 {
            return None;
        }
        let pool = Arc::new(Spares {
            dir: spare::dir_of(state, owner),
            templates: state.join(berth_shim::disk::template::DIR),
            size,
            ready: Mutex::new(Vec::new()),
            filling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            announced: AtomicBool::new(false),
            told_unmounted: AtomicBool::new(false),
            seq: AtomicU64::new(0),
        });
        pool.refill();
        Some(pool)
    }

    /// A ready spare, if there is one; the pool refills behind it.
    pub fn take(self: &Arc<Self>) -> Option<Spare> {
        let got = self.ready.lock().unwrap_or_else(|e| e.into_inner()).pop();
        self.refill();
        got
    }

    /// How many are ready.
    pub fn ready(&self) -> usize {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Makes spares up to [`WANT`] on a thread of its own, unless one is
    /// already at it. A failure is logged and ends this round: starts then
    /// make their images inline and report the same error themselves.
    pub fn refill(self: &Arc<Self>) {
        if self.closed.load(Ordering::SeqCst) || self.filling.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = self.clone();
        let spawned = std::thread::Builder::new().name("disk-spares".into()).spawn(move || {
            while !pool.closed.load(Ordering::SeqCst) && pool.ready() < WANT {
                let t = Instant::now();
                let made = std::fs::create_dir_all(&pool.dir)
                    .map_err(|e| format!("{}: {e}", pool.dir.display()))
                    .and_then(|()| {
                        let n = pool.seq.fetch_add(1, Ordering::Relaxed);
                        Spare::make(&pool.dir, &pool.templates, pool.size, n).map_err(|e| e.to_string())
                    });
                match made {
                    Ok(s) => {
                        debug!(dev = %s.dev().display(), ms = t.elapsed().as_secs_f64() * 1e3, "disk spare made");
                        if let Some(why) = s.unmounted() {
                            if !pool.told_unmounted.swap(true, Ordering::SeqCst) {
                                info!(
                                    error = why,
                                    "disk spares are bound but not mounted ahead (the new mount API is refused): \
                                     each start mounts its filesystem, 1-10 ms more"
                                );
                            }
                        }
                        let n = {
                            let mut ready = pool.ready.lock().unwrap_or_else(|e| e.into_inner());
                            ready.push(s);
                            ready.len()
                        };
                        if n == WANT && !pool.announced.swap(true, Ordering::SeqCst) {
                            info!(spares = WANT, dir = %pool.dir.display(), "disk spares ready");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot make a spare disk image; starts make theirs inline");
                        break;
                    }
                }
            }
            pool.filling.store(false, Ordering::SeqCst);
            // Closed while making one: it goes too.
            if pool.closed.load(Ordering::SeqCst) {
                pool.ready.lock().unwrap_or_else(|e| e.into_inner()).clear();
                let _ = std::fs::remove_dir(&pool.dir);
            }
        });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the disk spare thread");
            self.filling.store(false, Ordering::SeqCst);
        }
    }

    /// Drops every spare (unbinds and unlinks it) and makes no more: the
    /// agent is ending.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let _ = std::fs::remove_dir(&self.dir);
    }
}
