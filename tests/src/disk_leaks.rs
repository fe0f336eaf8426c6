//! The disk part of the leak scan: loop devices still bound to an image
//! file below an agent's temp dir (its state dir's instance images), read
//! from `/sys/block/loop*/loop/backing_file`. Mounts and image files are
//! found by the harness's mount and instance-dir scans; a loop device
//! outlives both when its last user is a forgotten mount namespace or fd,
//! so it has a scan of its own. Scoped to one agent's dir, so parallel
//! suites never see each other's devices.

use std::path::Path;

/// One line per loop device bound to a file below `dir`.
pub fn scan(dir: &Path) -> Vec<String> {
    bound_below(dir).into_iter().map(|(dev, file)| format!("loop device left: {dev} bound to {file}")).collect()
}

/// `(device, backing file)` of loop devices bound below `dir`. The backing
/// file may carry a " (deleted)" suffix: the image was unlinked while the
/// device was still bound, which is a leak all the same. A live agent's
/// spare images (`<state>/disk-spares/<owner>/`, bound until an instance
/// takes one) are its cache, not a leak: skipped while that agent's lock is
/// held, and leaks like any other once it is gone.
pub fn bound_below(dir: &Path) -> Vec<(String, String)> {
    let prefix = format!("{}/", dir.display());
    berth_shim::disk::bound_loops(Path::new("/sys"), &prefix)
        .into_iter()
        .filter(|(_, f)| f.starts_with(&prefix) && !live_spare(f))
        .map(|(d, f)| (d.display().to_string(), f))
        .collect()
}

/// Whether `file` is a spare image of a live agent.
pub fn live_spare(file: &str) -> bool {
    let marker = format!("/{}/", berth_shim::disk::spare::DIR);
    let Some((state, rest)) = file.split_once(&marker) else { return false };
    let Some((owner, name)) = rest.split_once('/') else { return false };
    !name.contains('/') && !name.ends_with(" (deleted)") && berth_agent::owner::alive(Path::new(state), owner)
}

/// Unbinds what [`scan`] finds (after the harness has detached the mounts),
/// so a failed test does not hold loop devices for the rest of the run.
pub fn cleanup(dir: &Path) {
    for (dev, _) in bound_below(dir) {
        let _ = berth_shim::sys::loopdev::clear(Path::new(&dev));
    }
}
