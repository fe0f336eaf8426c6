//! `berth-shim delete <instance-dir>`: cleans an instance from its files
//! alone, after the agent (and maybe the shim) died. This is how a
//! restarted agent sweeps what a crash left.
//!
//! It kills what the pid files name, but only if the very process still
//! runs (pid plus start time: a recycled pid is never signalled), then runs
//! the shim's own teardown steps. Running it twice is fine.

use crate::spec::{EndReason, Outcome, PidStamp, Spec, DAEMON_PID_FILE, SHIM_PID_FILE};
use crate::teardown;
use std::io;
use std::path::Path;
use std::time::Instant;

pub fn delete(dir: &Path, proc_root: &Path) -> Outcome {
    let started = Instant::now();
    let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match dir.symlink_metadata() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            crate::log!(dir_name, "{}: already deleted", dir.display());
            let mut out = Outcome::new(&dir_name, EndReason::Deleted);
            out.duration_ms = started.elapsed().as_millis() as u64;
            return out;
        }
        _ => {}
    }
    let (id, spec) = match Spec::load(dir) {
        Ok(s) => (s.id.clone(), Some(s)),
        Err(e) => (dir_name.clone(), {
            crate::log!(dir_name, "{e}: wiping the dir only");
            None
        }),
    };
    let mut out = Outcome::new(&id, EndReason::Deleted);
    if spec.is_none() {
        out.error = Some(format!(
            "{}: no readable spec; the dir is wiped but its cgroup and id lease are unknown here",
            dir.join(crate::spec::SPEC_FILE).display()
        ));
    }
    if let Some(s) = &spec {
        if s.dir != dir {
            crate::log!(id, "spec.json names {} as its dir; wiping {} as asked", s.dir.display(), dir.display());
        }
    }
    // The shim first: once it is gone it cannot start anything new, and
    // its death sends the daemon its parent-death SIGKILL.
    for (what, file) in [("shim", SHIM_PID_FILE), ("daemon", DAEMON_PID_FILE)] {
        if let Some(stamp) = PidStamp::load(&dir.join(file)) {
            if teardown::kill_stamp(what, &stamp, proc_root, &mut out) {
                crate::log!(id, "{what} pid {} was running: killed", stamp.pid);
            }
        }
    }
    let doomed = teardown::finish(&id, spec.as_ref(), dir, proc_root, None, &mut out);
    // The sweep waits for the bytes to go: it reports what is left.
    out.leftovers.extend(teardown::empty_trash(doomed));
    out.duration_ms = started.elapsed().as_millis() as u64;
    crate::log!(id, "deleted in {} ms, {} leftovers", out.duration_ms, out.leftovers.len());
    out
}
