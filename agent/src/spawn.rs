//! Spawning an instance: lease an id range, lay out its dir, record its spec,
//! create its cgroup with limits, start `berth-shim run`, and wait until the
//! daemon really answers on its socket.
//!
//! Order matters for crash safety: the lease first, then the dir, then the
//! spec (naming the cgroup dirs), then the cgroup. Whatever a crash leaves at
//! any point is named by a file the next agent's sweep reads.
#![forbid(unsafe_code)]

pub mod buildkitd;

use crate::admit::AdmitError;
use crate::instance::Instance;
use crate::reap::Shim;
use crate::sys;
use crate::Ctx;
use berth_shim::spec::{self, Outcome, Spec};
use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command;
use tracing::debug;

/// Creates the instance on disk and in the cgroup tree, and starts its shim.
pub async fn start(ctx: &Arc<Ctx>, inst: &Arc<Instance>) -> Result<Shim, AdmitError> {
    // Files, chowns and cgroup writes block (a v1 memory cgroup write can
    // wait ~10 ms for the kernel): off the two async workers, so a burst of
    // new clients does not stall every other connection.
    let (c, i) = (ctx.clone(), inst.clone());
    let spec = tokio::task::spawn_blocking(move || prepare(&c, &i))
        .await
        .map_err(|e| AdmitError::Internal(format!("instance {}: prepare task: {e}", inst.id)))??;
    let internal = |what: String| AdmitError::Internal(format!("instance {}: {what}", inst.id));
    let dir = &inst.dir;
    let child = Command::new(&ctx.shim)
        .arg("run")
        .arg(dir)
        .arg("--proc-root")
        .arg(&ctx.run.host.proc_root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    match child {
        Ok(child) => Ok(Shim::new(child, inst.id.clone(), dir.clone())),
        Err(e) => {
            // The shim never ran: clean up as it would have.
            let _ = berth_shim::cgroup::remove(&spec.cgroup, Duration::from_secs(1));
            let _ = fs::remove_dir_all(dir);
            let _ = fs::remove_file(&spec.lease);
            Err(internal(format!("starting {}: {e}", ctx.shim.display())))
        }
    }
}

/// Leases the ids, lays out the dir, records the spec and creates the
/// cgroup; undoes what it did on failure. Blocking.
fn prepare(ctx: &Ctx, inst: &Instance) -> Result<Spec, AdmitError> {
    let internal = |what: String| AdmitError::Internal(format!("instance {}: {what}", inst.id));
    let (ids, lease) = ctx
        .pool
        .lease(&format!("{} {}", inst.id, ctx.owner.id))
        .map_err(|e| AdmitError::Exhausted(format!("node {}: {e}", ctx.node_name)))?;
    let undo_lease = |e: AdmitError| {
        let _ = fs::remove_file(&lease);
        e
    };
    let dir = &inst.dir;
    let cgroup = ctx.layout.plan(&format!("berth-{}", inst.id));
    let spec = Spec {
        id: inst.id.clone(),
        dir: dir.clone(),
        ids,
        daemon: ctx.daemon.clone(),
        args: daemon_args(ctx, dir, &inst.socket(), &dir.join(spec::ROOT_DIR)),
        env: daemon_env(&inst.id, dir),
        cgroup,
        stop_grace_ms: ctx.run.stop_grace.as_millis() as u64,
        lease: lease.clone(),
        hostname: format!("berth-{}", inst.id),
        client: inst.client().display,
        client_key: inst.client().key,
        owner: ctx.owner.id.clone(),
        isolate_network: ctx.run.build_network == crate::config::BuildNetwork::None,
        log_cap_bytes: ctx.run.daemon_log_cap,
    };
    let config = buildkitd::render(&spec, ctx.run.limits.build_cpus, ctx.run.limits.build_disk);
    if let Err(e) = lay_out(&spec, &config) {
        let _ = fs::remove_dir_all(dir);
        return Err(undo_lease(internal(e)));
    }
    if let Err(e) = ctx.layout.create(&format!("berth-{}", inst.id), &ctx.run.limits.limits()) {
        let _ = fs::remove_dir_all(dir);
        return Err(undo_lease(internal(e.to_string())));
    }
    Ok(spec)
}

fn daemon_args(ctx: &Ctx, dir: &Path, socket: &Path, root: &Path) -> Vec<String> {
    let mut args = vec![
        "--addr".to_string(),
        format!("unix://{}", socket.display()),
        "--root".to_string(),
        root.display().to_string(),
        "--config".to_string(),
        dir.join(buildkitd::FILE).display().to_string(),
        "--otel-socket-path".to_string(),
        dir.join(spec::RUN_DIR).join(buildkitd::OTEL_SOCKET).display().to_string(),
    ];
    args.extend(ctx.run.daemon_args.iter().cloned());
    args
}

/// The daemon's whole environment: nothing of the agent's leaks in, and every
/// runtime path is the instance's own (buildkitd and runc otherwise share
/// host-wide paths such as /run/runc between instances).
fn daemon_env(id: &str, dir: &Path) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ("HOME".into(), dir.join(spec::HOME_DIR).display().to_string()),
        ("XDG_RUNTIME_DIR".into(), dir.join(spec::RUN_DIR).display().to_string()),
        ("USER".into(), "berth".into()),
        ("BERTH_INSTANCE".into(), id.into()),
    ]
}

/// The instance dir (root's, 0711 so the mapped root can reach its subdirs)
/// and the subdirs owned by the instance's root.
fn lay_out(spec: &Spec, config: &str) -> Result<(), String> {
    let mk = |p: &Path, mode: u32| -> Result<(), String> {
        fs::create_dir(p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
        sys::chmod(p, mode).map_err(|e| e.to_string())
    };
    mk(&spec.dir, 0o711)?;
    spec.store().map_err(|e| e.to_string())?;
    let cfg = spec.dir.join(buildkitd::FILE);
    fs::write(&cfg, config).map_err(|e| format!("write {}: {e}", cfg.display()))?;
    sys::chmod(&cfg, 0o644).map_err(|e| e.to_string())?;
    for sub in [spec::ROOT_DIR, spec::RUN_DIR, spec::HOME_DIR] {
        let p = spec.dir.join(sub);
        mk(&p, 0o700)?;
        sys::chown_path(&p, spec.ids.host_base, spec.ids.host_base).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Waits until the daemon answers a real gRPC call on its socket (the socket
/// file exists before the daemon serves). On failure the shim has ended and
/// its outcome (with the daemon's stderr tail) is returned with the error.
pub async fn wait_ready(
    ctx: &Arc<Ctx>,
    inst: &Arc<Instance>,
    shim: &mut Shim,
) -> Result<(), (AdmitError, Option<Outcome>)> {
    let deadline = Instant::now() + ctx.run.start_timeout;
    let socket = inst.socket();
    let started = Instant::now();
    loop {
        if socket.exists() && crate::probe::ready(&socket).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let outcome = shim.stop(ctx).await;
            let tail = outcome.as_ref().map(|o| with_hint(&o.stderr_tail)).unwrap_or_default();
            return Err((AdmitError::NotReady { id: inst.id.clone(), timeout: ctx.run.start_timeout, tail }, outcome));
        }
        tokio::select! {
            outcome = shim.ended() => {
                let reason = match &outcome {
                    Some(o) => describe_exit(o),
                    None => "the shim died without a report".to_string(),
                };
                let tail = outcome.as_ref().map(|o| with_hint(&o.stderr_tail)).unwrap_or_default();
                let e = AdmitError::StartFailed { id: inst.id.clone(), client: inst.client().display, reason, tail };
                return Err((e, outcome));
            }
            _ = tokio::time::sleep(probe_interval(started.elapsed())) => {}
        }
        debug!(socket = %socket.display(), "waiting for the daemon");
    }
}

/// How long to wait before the next readiness probe. Most daemons (fakekitd
/// in ~5 ms, buildkitd in ~200 ms) answer soon after start, and a probe
/// before the socket exists is one stat: probe every millisecond at first,
/// then back off so a slow daemon costs little. (Exponential backoff from
/// the start quantized readiness to 2, 6, 14, 30 ms after start; see
/// docs/benchmarks.md, figure 1.)
fn probe_interval(since_start: Duration) -> Duration {
    match since_start.as_millis() {
        0..=100 => Duration::from_millis(1),
        101..=1000 => Duration::from_millis(5),
        _ => Duration::from_millis(25),
    }
}

/// The stderr tail with a plain-words hint appended when one matches.
fn with_hint(tail: &str) -> String {
    format!("{}{}", tail.trim_end(), crate::hints::for_stderr(tail))
}

/// "daemon exited with status 1" / "killed by signal 9 (OOM)" etc.
pub fn describe_exit(o: &Outcome) -> String {
    let mut s = match (o.exit_code, o.signal, &o.error) {
        (_, _, Some(err)) => format!("shim error: {err}"),
        (Some(code), _, _) => format!("the daemon exited with status {code}"),
        (_, Some(sig), _) => format!("the daemon was killed by signal {sig}"),
        _ => "the daemon ended".to_string(),
    };
    if o.oom_kills > 0 {
        s.push_str(" after hitting the memory limit (OOM kill)");
    }
    s
}
