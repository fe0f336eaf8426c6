//! A warm sandbox (`--warm-stage sandbox`): the shim makes the instance up
//! to the daemon's exec and says `held` (berth_shim's `run/hold`); the
//! agent's go on the lifeline, at the claim, execs a fresh daemon, whose
//! readiness is then found as for any start (`spawn::wait_ready`).
//!
//! Made ahead: the id lease, dir and spec, cgroup, disk, the shim's exec,
//! the clone into new namespaces, the maps, the cgroup join and the veth
//! with its addresses and firewall element. Left to the claim: the child's
//! last steps (credentials, hostname, /proc) and the daemon's own boot.
//! Nothing the daemon could touch exists before its exec, so the daemon a
//! client gets is as fresh as a cold start's.

use super::Outcome;
use crate::error::AdmitError;
use crate::instance::Instance;
use crate::shim::Shim;
use crate::Ctx;
use std::sync::Arc;

/// Waits until the sandbox is made (the shim's `held` line), within the
/// start timeout. On failure the shim has ended and its outcome is returned
/// with the error, as from `wait_ready`.
pub async fn wait(ctx: &Arc<Ctx>, inst: &Arc<Instance>, shim: &mut Shim) -> Result<(), (AdmitError, Option<Outcome>)> {
    let deadline = tokio::time::Instant::now() + ctx.run.start_timeout;
    let held = shim.take_held();
    let ended = tokio::select! {
        biased;
        // Without the line (its report ended first), only the outcome is left.
        Ok(()) = async { held.expect("a sandbox's `held` is taken once").await } => return Ok(()),
        outcome = shim.ended() => Some(outcome),
        _ = tokio::time::sleep_until(deadline) => None,
    };
    Err(super::start_error(ctx, inst, shim, ended).await)
}

/// The go could not be written (the shim is gone or its lifeline broke):
/// the start failed; the shim is stopped (or already ended) and its outcome
/// returned.
pub async fn go_failed(
    ctx: &Ctx,
    inst: &Instance,
    shim: &mut Shim,
    e: std::io::Error,
) -> (AdmitError, Option<Outcome>) {
    let outcome = shim.stop(ctx).await;
    let reason = format!("the sandbox's shim could not be told to start the daemon: {e}");
    (
        AdmitError::StartFailed { id: inst.id.clone(), client: inst.client().display, reason, tail: String::new() },
        outcome,
    )
}
