//! Who has which instance: client -> instance, the warm pool, the warm
//! pool's rest after a failed start, and recent start failures by client.
//! All of it sits behind ONE lock, so there is no lock order to keep
//! between them. The lock is never held across an await. Inside it, only
//! an instance's own locks are taken (phase, then client), never the other
//! way round.
//!
//! Admission, the warm pool and an instance's life change it only through
//! these methods.

#[cfg(test)]
mod tests;

use crate::client::Client;
use crate::error::AdmitError;
use crate::instance::Instance;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;
use tracing::info;

#[derive(Default)]
struct Inner {
    by_client: HashMap<String, Arc<Instance>>,
    /// Warm instances not yet claimed, oldest first.
    warm: VecDeque<Arc<Instance>>,
    /// Recent start failures, answered from here for `--start-failure-backoff`
    /// (clients such as buildx retry in a loop).
    failures: HashMap<String, (Instant, AdmitError)>,
    /// Until when the warm pool rests after a failed start.
    warm_backoff: Option<Instant>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    failure_backoff: Duration,
}

/// What `attach` found for a client. Every variant but `Empty` and
/// `Draining` has counted one more connection on the instance.
pub enum Attach {
    /// The client's running (or starting) instance.
    Joined(Arc<Instance>),
    /// A warm instance, now the client's: the pool wants a replacement.
    Claimed(Arc<Instance>),
    /// A new instance from `new`: the caller launches it.
    Created(Arc<Instance>),
    /// No instance and no slot given.
    Empty,
    /// No instance, and the agent takes no new clients.
    Draining,
}

impl Attach {
    pub fn instance(&self) -> Option<&Arc<Instance>> {
        match self {
            Attach::Joined(i) | Attach::Claimed(i) | Attach::Created(i) => Some(i),
            Attach::Empty | Attach::Draining => None,
        }
    }
}

impl Registry {
    pub fn new(failure_backoff: Duration) -> Registry {
        Registry { inner: Mutex::new(Inner::default()), failure_backoff }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("registry lock")
    }

    /// Finds the client's instance, else (when `new` is given: the caller
    /// holds a slot) registers a new one, else claims a warm one; and counts
    /// one more connection on it. The count is taken under the registry
    /// lock, which `unregister` holds too: the reaper never ends an instance
    /// a connection has just joined.
    pub fn attach(&self, client: &Client, draining: bool, new: Option<impl FnOnce() -> Arc<Instance>>) -> Attach {
        let mut inner = self.lock();
        let found = match inner.by_client.get(&client.key).cloned() {
            Some(i) => Attach::Joined(i),
            None if draining => return Attach::Draining,
            // A client that waited for a slot gets a fresh instance; the
            // pool is only refilled while nobody waits.
            None => match new {
                Some(new) => Attach::Created(new()),
                None => match Self::claim_warm(&mut inner, client) {
                    Some(i) => Attach::Claimed(i),
                    None => return Attach::Empty,
                },
            },
        };
        let inst = found.instance().expect("attach found an instance").clone();
        inner.by_client.insert(client.key.clone(), inst.clone());
        inst.conns.send_modify(|c| *c += 1);
        found
    }

    /// A pod's socket claims a held warm sandbox, if the pool has one: the
    /// pod's listener goes with its go (handoff.rs), so its daemon serves
    /// the pod from its exec. The listener is set before the claim makes the
    /// sandbox `Starting`, under the registry lock; counts one connection,
    /// as `attach` does. Daemon-stage warm instances are never taken here (a
    /// running daemon cannot take a listener).
    pub fn claim_sandbox(&self, client: &Client, listener: &Arc<std::os::fd::OwnedFd>) -> Option<Arc<Instance>> {
        let mut inner = self.lock();
        if inner.by_client.contains_key(&client.key) {
            return None;
        }
        let at = inner.warm.iter().position(|i| i.held && !i.phase.borrow().is_over() && i.listener.get().is_none())?;
        let inst = inner.warm.remove(at).expect("position is in range");
        if inst.listener.set(listener.clone()).is_err() || !inst.claim(client) {
            return None;
        }
        info!(instance = %inst.id, client = %client.display, "claimed a warm sandbox for a pod's socket");
        inner.by_client.insert(client.key.clone(), inst.clone());
        inst.conns.send_modify(|c| *c += 1);
        Some(inst)
    }

    /// Takes the oldest live warm instance for `client`.
    fn claim_warm(inner: &mut Inner, client: &Client) -> Option<Arc<Instance>> {
        while let Some(inst) = inner.warm.pop_front() {
            if inst.phase.borrow().is_over() {
                continue;
            }
            if inst.claim(client) {
                info!(instance = %inst.id, client = %client.display, "claimed a warm instance");
                return Some(inst);
            }
        }
        None
    }

    /// The client's instance, if it has one here.
    pub fn get(&self, key: &str) -> Option<Arc<Instance>> {
        self.lock().by_client.get(key).cloned()
    }

    /// How many clients have an instance here.
    pub fn clients(&self) -> usize {
        self.lock().by_client.len()
    }

    /// Removes the instance if it is still the one registered for its
    /// client and, unless `force`, has no connection; also from the warm
    /// pool. Returns whether the instance may end.
    pub fn unregister(&self, inst: &Arc<Instance>, force: bool) -> bool {
        let mut inner = self.lock();
        if !force && *inst.conns.borrow() > 0 {
            return false;
        }
        let key = inst.client().key;
        if inner.by_client.get(&key).is_some_and(|i| Arc::ptr_eq(i, inst)) {
            inner.by_client.remove(&key);
        }
        inner.warm.retain(|i| !Arc::ptr_eq(i, inst));
        true
    }

    /// Ends an unclaimed warm instance's wait: true if it is now out of the
    /// pool and ends; false if a client claimed it first (then it serves).
    pub fn end_unclaimed(&self, inst: &Arc<Instance>) -> bool {
        let mut inner = self.lock();
        if !inst.retire() {
            return false;
        }
        inner.warm.retain(|i| !Arc::ptr_eq(i, inst));
        true
    }

    /// Takes the newest unclaimed warm instance out of the pool for good, so
    /// that it ends and its slot goes to a client the pool cannot serve (a
    /// pod socket handed to its daemon). The caller ends it (`stop`).
    pub fn retire_one_warm(&self) -> Option<Arc<Instance>> {
        let mut inner = self.lock();
        while let Some(inst) = inner.warm.pop_back() {
            if !inst.phase.borrow().is_over() && inst.retire() {
                return Some(inst);
            }
        }
        None
    }

    /// Records a start failure for the backoff; forgets stale ones.
    pub fn note_failure(&self, client: &Client, e: &AdmitError) {
        let backoff = self.failure_backoff;
        if backoff.is_zero() {
            return;
        }
        let mut inner = self.lock();
        inner.failures.retain(|_, (at, _)| at.elapsed() < backoff);
        inner.failures.insert(client.key.clone(), (Instant::now(), e.clone()));
    }

    /// The client's last start failure, if it is younger than the backoff:
    /// a daemon that failed a second ago will fail again, and clients that
    /// retry in a loop (buildx's bootstrap polls for 20 s) should not start
    /// one instance per retry.
    pub fn recent_failure(&self, client: &Client) -> Option<AdmitError> {
        let inner = self.lock();
        let (at, e) = inner.failures.get(&client.key)?;
        (at.elapsed() < self.failure_backoff).then(|| e.clone())
    }

    /// Adds a just-launched warm instance to the pool.
    pub fn add_warm(&self, inst: Arc<Instance>) {
        self.lock().warm.push_back(inst);
    }

    /// Unclaimed warm instances (they hold slots but serve nobody yet).
    pub fn warm_len(&self) -> usize {
        self.lock().warm.len()
    }

    /// Until when the warm pool rests, if it does.
    pub fn warm_resting(&self) -> Option<Instant> {
        self.lock().warm_backoff.filter(|until| Instant::now() < *until)
    }

    /// A warm start failed: the pool rests for `pause`.
    pub fn warm_failed(&self, pause: Duration) {
        self.lock().warm_backoff = Some(Instant::now() + pause);
    }
}
