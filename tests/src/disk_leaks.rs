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
/// device was still bound, which is a leak all the same.
pub fn bound_below(dir: &Path) -> Vec<(String, String)> {
    let prefix = format!("{}/", dir.display());
    berth_shim::disk::bound_loops(Path::new("/sys"), &prefix)
        .into_iter()
        .filter(|(_, f)| f.starts_with(&prefix))
        .map(|(d, f)| (d.display().to_string(), f))
        .collect()
}

/// Unbinds what [`scan`] finds (after the harness has detached the mounts),
/// so a failed test does not hold loop devices for the rest of the run.
pub fn cleanup(dir: &Path) {
    for (dev, _) in bound_below(dir) {
        let _ = berth_shim::sys::loopdev::clear(Path::new(&dev));
    }
}
