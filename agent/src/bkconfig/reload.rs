//! Reloading the fragment without a restart: on SIGHUP, or when the file
//! (or a file it names) changes. The file is polled (device, inode, size,
//! mtime, ctime) every `POLL`: a Kubernetes ConfigMap or Secret update
//! swaps a symlink, which inotify on the file itself would miss, and a poll
//! of a handful of stats costs nothing. A good new fragment reaches the
//! next instances (running ones keep the config they started with); a bad
//! one is logged with its line and column and the old one stays in force.

use super::{BkConfigError, Fragment};
use crate::metrics::Metrics;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::signal::unix::Signal;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// How often the file's stat is compared.
pub const POLL: Duration = Duration::from_secs(2);

type Fingerprint = Vec<(PathBuf, Option<(u64, u64, u64, i64, i64, i64, i64)>)>;

/// The fragment in force, and where it comes from.
pub struct Source {
    path: Option<PathBuf>,
    budget: u64,
    current: watch::Sender<Option<Arc<Fragment>>>,
    /// The stats of the files at the last load attempt, good or bad.
    seen: Mutex<Fingerprint>,
}

impl Source {
    /// No `--buildkitd-config`: instances get berth's config alone.
    pub fn off() -> Source {
        Source { path: None, budget: 0, current: watch::Sender::new(None), seen: Mutex::new(Vec::new()) }
    }

    /// Loads the fragment at start; an error refuses the start.
    pub fn start(path: Option<&Path>, budget: u64) -> Result<Source, BkConfigError> {
        let Some(path) = path else { return Ok(Source::off()) };
        let seen = fingerprint(path, &[]);
        let f = super::load(path, budget)?;
        log_loaded(&f, "loaded");
        let seen = [seen, fingerprint_files(&f)].concat();
        Ok(Source {
            path: Some(path.into()),
            budget,
            current: watch::Sender::new(Some(Arc::new(f))),
            seen: Mutex::new(seen),
        })
    }

    /// The fragment new instances get now.
    pub fn current(&self) -> Option<Arc<Fragment>> {
        self.current.borrow().clone()
    }

    /// Changes when a reload puts a new fragment in force (the warm pool
    /// retires instances started with the old one).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Fragment>>> {
        self.current.subscribe()
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Loads the file again. Ok(true): a new fragment is in force; Ok(false):
    /// same content; Err: refused, the old one stays.
    pub fn reload(&self, metrics: &Metrics) -> Result<bool, BkConfigError> {
        let Some(path) = &self.path else { return Ok(false) };
        let mut seen = fingerprint(path, &[]);
        let loaded = super::load(path, self.budget);
        let result = match loaded {
            Ok(f) => {
                seen.extend(fingerprint_files(&f));
                let old = self.current();
                if old.as_ref().map(|o| o.hash == f.hash).unwrap_or(false) {
                    Ok(false)
                } else {
                    if let Some(o) = &old {
                        metrics.buildkitd_config_info.remove(&hash_label(o));
                    }
                    metrics.buildkitd_config_info.get_or_create(&hash_label(&f)).set(1);
                    log_loaded(&f, "reloaded: new instances get it, running ones keep theirs");
                    self.current.send_replace(Some(Arc::new(f)));
                    Ok(true)
                }
            }
            Err(e) => {
                if let Some(o) = self.current() {
                    seen.extend(fingerprint_files(&o));
                }
                Err(e)
            }
        };
        let label = if result.is_ok() { "ok" } else { "refused" };
        metrics.buildkitd_config_reloads.get_or_create(&crate::metrics::ResultLabel { result: label.into() }).inc();
        *self.seen.lock().unwrap() = seen;
        result
    }

    /// Whether the file or one it names changed since the last load attempt.
    pub fn changed(&self) -> bool {
        let Some(path) = &self.path else { return false };
        let seen = self.seen.lock().unwrap();
        let others: Vec<PathBuf> = seen.iter().skip(1).map(|(p, _)| p.clone()).collect();
        fingerprint(path, &others) != *seen
    }

    /// The info gauge's first value (at start).
    pub fn publish(&self, metrics: &Metrics) {
        if let Some(f) = self.current() {
            metrics.buildkitd_config_info.get_or_create(&hash_label(&f)).set(1);
        }
    }
}

fn hash_label(f: &Fragment) -> crate::metrics::HashLabel {
    crate::metrics::HashLabel { sha256: f.hash.clone() }
}

fn log_loaded(f: &Fragment, what: &str) {
    for c in &f.clamped {
        warn!(file = %f.path.display(), "buildkitd config: {c}");
    }
    info!(file = %f.path.display(), sha256 = %f.hash, files = f.files.len(), "buildkitd config {what}");
}

fn fingerprint(path: &Path, others: &[PathBuf]) -> Fingerprint {
    std::iter::once(path.to_path_buf()).chain(others.iter().cloned()).map(|p| (p.clone(), stat(&p))).collect()
}

fn fingerprint_files(f: &Fragment) -> Fingerprint {
    f.files.iter().map(|c| (c.source.clone(), stat(&c.source))).collect()
}

fn stat(p: &Path) -> Option<(u64, u64, u64, i64, i64, i64, i64)> {
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

/// Reloads on SIGHUP and on a change seen by the poll, until shutdown.
pub async fn watch(ctx: Arc<crate::Ctx>, mut hangup: Signal) {
    let mut shutdown = ctx.shutdown.subscribe();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            _ = hangup.recv() => "SIGHUP",
            _ = tick.tick() => {
                if !ctx.bkconfig.changed() {
                    continue;
                }
                "file changed"
            }
            _ = shutdown.changed() => return,
        };
        if ctx.bkconfig.path().is_none() {
            info!("{why}: no --buildkitd-config to reload");
            continue;
        }
        match ctx.bkconfig.reload(&ctx.metrics) {
            Ok(true) => {}
            Ok(false) => info!(reason = why, "buildkitd config unchanged"),
            Err(e) => error!(
                reason = why,
                error = %e,
                kind = e.metric_label(),
                "buildkitd config refused; the one loaded before stays in force"
            ),
        }
    }
}
