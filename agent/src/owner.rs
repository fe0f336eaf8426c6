//! Ownership on disk, so that two agents on one node (a rollout with
//! maxSurge: 1) never sweep each other's live instances. Each agent holds an
//! exclusive flock on `<state>/agents/<id>.lock` for its whole life; the
//! kernel drops it when the agent dies, however it dies. An instance whose
//! owner's lock can be taken belongs to a dead agent.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

pub struct Owner {
    pub id: String,
    pub path: PathBuf,
    _lock: Flock<File>,
}

fn lock_path(state: &Path, id: &str) -> PathBuf {
    state.join("agents").join(format!("{id}.lock"))
}

impl Owner {
    /// Takes this agent's lock under a fresh id.
    pub fn acquire(state: &Path) -> io::Result<Owner> {
        let dir = state.join("agents");
        std::fs::create_dir_all(&dir).map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", dir.display())))?;
        let id = format!("agent-{}-{}", std::process::id(), crate::sys::random_id());
        let path = lock_path(state, &id);
        let file = OpenOptions::new().create_new(true).write(true).open(&path)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io::Error::new(io::Error::from(e).kind(), format!("flock {}: {e}", path.display())))?;
        Ok(Owner { id, path, _lock: lock })
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// True while the agent `id` lives (its lock is held). An empty id (an
/// instance written before owners were recorded) counts as dead.
pub fn alive(state: &Path, id: &str) -> bool {
    if id.is_empty() {
        return false;
    }
    let Ok(file) = File::open(lock_path(state, id)) else { return false };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => false,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => true,
        Err(_) => false,
    }
}

/// Removes lock files of dead agents (their instances are already swept).
pub fn sweep_dead(state: &Path, me: &str) -> usize {
    let Ok(rd) = std::fs::read_dir(state.join("agents")) else { return 0 };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(id) = name.strip_suffix(".lock") else { continue };
        if id != me && !alive(state, id) && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_alive_and_a_dropped_one_is_not() {
        let t = tempfile::tempdir().unwrap();
        let a = Owner::acquire(t.path()).unwrap();
        let b = Owner::acquire(t.path()).unwrap();
        assert_ne!(a.id, b.id);
        assert!(alive(t.path(), &a.id));
        assert!(!alive(t.path(), "agent-gone"));
        assert!(!alive(t.path(), ""));
        // A dead agent's lock file stays behind but is free: dead.
        let a_id = a.id.clone();
        let kept = std::fs::read(&a.path).unwrap();
        drop(a);
        std::fs::write(lock_path(t.path(), &a_id), kept).unwrap();
        assert!(!alive(t.path(), &a_id));
        assert_eq!(sweep_dead(t.path(), &b.id), 1);
        assert!(alive(t.path(), &b.id));
    }
}
