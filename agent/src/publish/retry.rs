//! When and how the publisher (and the Event poster, `reap::post`) retries a
//! failed API call: exponential backoff with jitter, and which answers are
//! worth retrying soon. The jitter is a xorshift seeded from the clock and
//! pid, hand-written because it needs spread, not secrecy, and no crate's
//! backoff type knows the refusal-at-the-cap rule below.

use super::RBAC_FIX;
use std::time::Duration;

/// Exponential backoff: `min`, doubling per call up to `max`, optionally jittered.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    jitter: bool,
    rng: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, jitter: bool) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((std::process::id() as u64) << 32);
        let min = min.min(max);
        Backoff { min, max, next: min, jitter, rng: seed | 1 }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        self.jittered(d)
    }

    /// The delay at the cap (after a refusal that retrying soon will not fix).
    pub fn at_cap(&mut self) -> Duration {
        self.jittered(self.max)
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    fn jittered(&mut self, d: Duration) -> Duration {
        if !self.jitter {
            return d;
        }
        // xorshift64: spread, not secrecy.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = d / 2;
        half + Duration::from_nanos(self.rng % (half.as_nanos() as u64 + 1))
    }
}

/// How a failed call is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// No connection, a timeout, 5xx, 429: retry soon, backing off.
    Transient,
    /// The API server answered with a refusal retrying soon will not fix.
    Refused(u16),
}

pub fn classify(e: &kube::Error) -> Class {
    match e {
        kube::Error::Api(s) if s.code == 429 || s.code >= 500 || s.code == 0 => Class::Transient,
        kube::Error::Api(s) => Class::Refused(s.code),
        _ => Class::Transient,
    }
}

/// What the fix for a refusal is, for the log line.
pub fn fix_for(code: u16, node: &str, resource: &str) -> String {
    match code {
        401 => "the API server rejected the credentials: check the ServiceAccount token mount (automountServiceAccountToken) or the kubeconfig".into(),
        403 => RBAC_FIX.into(),
        404 => format!("there is no Node named {node:?}: set --node-name or NODE_NAME from the downward API (fieldRef spec.nodeName)"),
        400 | 422 => format!("the API server rejected the patch: check --extended-resource-name ({resource:?})"),
        _ => "see the error; retrying at the backoff cap".into(),
    }
}
