//! Spawning an instance: lease an id range, lay out its dir, record its spec,
//! create its cgroup with limits, start `berth-shim run`, and wait until the
//! daemon really answers on its socket.
//!
//! Order matters for crash safety: the lease first, then the dir, then the
//! spec (naming the cgroup dirs), then the cgroup. Whatever a crash leaves at
//! any point is named by a file the next agent's sweep reads.
//!
//! The instance's resources are acquired in ONE place, `prepare`, and, if
//! the shim never ran, released in ONE place, `release`; once the shim runs,
//! its wipe (or `berth-shim delete <dir>`) releases them from the spec. A new
//! per-instance resource (a veth and an address lease, a disk image or a
//! quota) goes into `prepare` after the spec records it, into `release`, and
//! into the shim's wipe.

pub mod buildkitd;
pub mod held;
pub mod tools;

use crate::error::{AdmitError, SpawnError};
use crate::instance::Instance;
use crate::notify;
use crate::shim::{describe_exit, Shim};
use crate::sys;
use crate::Ctx;
use berth_shim::disk::DiskSpec;
use berth_shim::spec::{self, Outcome, Spec};
use berth_shim::steps::Steps;
use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command;
use tracing::debug;

/// Creates the instance on disk and in the cgroup tree, and starts its shim.
/// Every error is answered to the client through `AdmitError::Spawn`.
pub async fn start(ctx: &Arc<Ctx>, inst: &Arc<Instance>) -> Result<Shim, AdmitError> {
    start_shim(ctx, inst).await.map_err(|e| AdmitError::Spawn {
        node: ctx.node_name.clone(),
        id: inst.id.clone(),
        source: Arc::new(e),
    })
}

async fn start_shim(ctx: &Arc<Ctx>, inst: &Arc<Instance>) -> Result<Shim, SpawnError> {
    // Files, chowns and cgroup writes block (a v1 memory cgroup write can
    // wait ~10 ms for the kernel): off the two async workers, so a burst of
    // new clients does not stall every other connection.
    let (c, i) = (ctx.clone(), inst.clone());
    let t0 = Instant::now();
    let (spec, mut steps) =
        tokio::task::spawn_blocking(move || prepare(&c, &i)).await.map_err(|e| SpawnError::Task(e.to_string()))??;
    steps.add("prepare", t0.elapsed());
    steps.reset();
    // Readiness hook: the daemon's NOTIFY_SOCKET, bound before the daemon
    // exists (its file goes with the instance dir).
    let notify = match notify::bind(&inst.dir, spec.ids.host_base) {
        Ok(n) => n,
        Err(e) => {
            release(&spec, &ctx.run.host.proc_root);
            return Err(SpawnError::Notify(e));
        }
    };
    steps.mark("notify");
    let dir = &inst.dir;
    let mut cmd = Command::new(&ctx.shim);
    // Handoff hook (issue 15): the pod's listener becomes the shim's fd 3.
    if let Some(l) = inst.listener.get() {
        use command_fds::{CommandFdExt, FdMapping};
        let mapped = l.try_clone().map_err(|source| SpawnError::Exec { path: ctx.shim.clone(), source });
        let mapped = match mapped {
            Ok(fd) => fd,
            Err(e) => {
                release(&spec, &ctx.run.host.proc_root);
                return Err(e);
            }
        };
        let fds = vec![FdMapping { parent_fd: mapped, child_fd: spec::LISTEN_FD }];
        cmd.fd_mappings(fds).expect("one mapping cannot collide");
    }
    // A sandbox's lifeline is a unix socket: its go may carry a pod's
    // listener (SCM_RIGHTS). Others have a pipe.
    let (stdin, go_line) = match inst.held {
        true => match std::os::unix::net::UnixStream::pair() {
            Ok((ours, theirs)) => (Stdio::from(std::os::fd::OwnedFd::from(theirs)), Some(ours)),
            Err(source) => {
                release(&spec, &ctx.run.host.proc_root);
                return Err(SpawnError::Exec { path: ctx.shim.clone(), source });
            }
        },
        false => (Stdio::piped(), None),
    };
    let child = cmd
        .arg("run")
        .arg(dir)
        .arg("--proc-root")
        .arg(&ctx.run.host.proc_root)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    match child {
        Ok(child) => {
            steps.mark("shim_spawn");
            let mut shim = Shim::new(child, inst.id.clone(), dir.clone(), go_line, &ctx.tasks);
            shim.notify = Some(notify);
            shim.start_steps = steps.render();
            Ok(shim)
        }
        Err(source) => {
            release(&spec, &ctx.run.host.proc_root);
            Err(SpawnError::Exec { path: ctx.shim.clone(), source })
        }
    }
}

/// Acquires the instance's resources, in this order, and records each in
/// the spec on disk before the next: the id lease, the dir and spec, then
/// the cgroup and the disk (side by side: both are named by the spec, and
/// independent of each other until the shim clones). A new per-instance
/// resource (a veth and its address lease, a disk image or quota) goes
/// here: acquired after the spec names it (store the spec again), released
/// in `release` and, after the shim started, by the shim's wipe and
/// `berth-shim delete`, which read it from the spec. Undoes what it did on
/// failure. Blocking. Returns the spec and the time of each step.
fn prepare(ctx: &Ctx, inst: &Instance) -> Result<(Spec, Steps), SpawnError> {
    let mut steps = Steps::new();
    let (ids, lease) = ctx.pool.lease(&format!("{} {}", inst.id, ctx.owner.id)).map_err(SpawnError::Lease)?;
    steps.mark("lease");
    // Isolated network: a /30 of the build subnet (see `network`); the shim
    // makes the veth from the spec.
    let network = match ctx.network.as_ref().map(|n| n.lease(&inst.id, &ctx.owner.id)).transpose() {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_file(&lease);
            ctx.metrics.network.failed(e.metric_label());
            return Err(SpawnError::Network(e));
        }
    };
    let dir = &inst.dir;
    let cgroup = ctx.layout.plan(&format!("berth-{}", inst.id));
    let spec = Spec {
        id: inst.id.clone(),
        dir: dir.clone(),
        ids,
        daemon: ctx.daemon.clone(),
        args: daemon_args(ctx, dir, &inst.socket(), &dir.join(spec::ROOT_DIR), inst.listener.get().is_some()),
        env: daemon_env(&inst.id, dir, &ctx.daemon_path),
        cgroup,
        stop_grace_ms: ctx.run.stop_grace.as_millis() as u64,
        lease: lease.clone(),
        hostname: format!("berth-{}", inst.id),
        client: inst.client().display,
        client_key: inst.client().key,
        owner: ctx.owner.id.clone(),
        isolate_network: ctx.run.net.build_network != crate::config::BuildNetwork::Host,
        log_cap_bytes: ctx.run.daemon_log_cap,
        // Disk hook: recorded in the spec before the image exists.
        disk: (ctx.run.limits.build_disk > 0)
            .then(|| DiskSpec::new(dir, dir.join(spec::ROOT_DIR), ctx.run.limits.build_disk)),
        network,
        listen_fd: inst.listener.get().is_some(),
        hold: inst.held,
        // A pod's socket may claim the sandbox: its listener comes with the go.
        hold_fd_args: if inst.held { FD_ADDR.map(String::from).to_vec() } else { Vec::new() },
    };
    // bkconfig: one fragment for both the config and the copies it names.
    let fragment = ctx.bkconfig.current();
    let config =
        buildkitd::render(&spec, ctx.run.limits.build_cpus, gc_budget(ctx.run.limits.build_disk), fragment.as_deref());
    steps.mark("spec");
    let acquired = lay_out(&spec, &config).and_then(|()| {
        steps.mark("layout");
        std::thread::scope(|s| {
            // Disk hook: the image, its loop device and its mount (acquire
            // undoes its own steps on failure), from a spare when one is
            // ready, on a thread of its own beside the files and the cgroup.
            let disk = spec.disk.as_ref().map(|disk| {
                let spare = ctx.spares.as_ref().and_then(|p| p.take());
                let templates = ctx.run.host.state_dir.join(berth_shim::disk::template::DIR);
                let owner = spec.ids.host_base;
                s.spawn(move || {
                    let t = Instant::now();
                    (berth_shim::disk::acquire_timed(disk, owner, &templates, spare), t.elapsed())
                })
            });
            let rest = (|| -> Result<(), SpawnError> {
                if let Some(n) = &ctx.network {
                    n.write_files(&spec).map_err(|(path, source)| SpawnError::Layout { path, source })?;
                }
                if let Some(f) = &fragment {
                    crate::bkconfig::files::install(dir, spec.ids.host_base, &f.files)
                        .map_err(|(path, source)| SpawnError::Layout { path, source })?;
                }
                steps.mark("files");
                ctx.layout
                    .create(&format!("berth-{}", inst.id), &ctx.run.limits.limits())
                    .map_err(SpawnError::Cgroup)?;
                steps.mark("cgroup");
                Ok(())
            })();
            let disk = disk.map(|h| h.join().expect("the disk thread does not panic"));
            if let Some((res, took)) = disk {
                match res {
                    Ok(d) => {
                        steps.add("disk", took);
                        steps.nest("disk", &d);
                    }
                    Err(e) => return rest.and(Err(SpawnError::Disk(e))),
                }
            }
            steps.reset();
            rest
        })
    });
    match acquired {
        Ok(()) => Ok((spec, steps)),
        Err(e) => {
            release(&spec, &ctx.run.host.proc_root);
            Err(e)
        }
    }
}

/// buildkit's gc target inside a disk limit: 80% of it, so that gc runs
/// before the filesystem is full (0, unlimited: buildkit's own default).
pub fn gc_budget(disk: u64) -> u64 {
    disk / 5 * 4
}

/// Releases what `prepare` acquired, for an instance whose shim never ran
/// (once it runs, the shim's wipe does this). Each step tolerates a
/// resource that was never acquired.
fn release(spec: &Spec, proc_root: &Path) {
    let _ = berth_shim::cgroup::remove(&spec.cgroup, Duration::from_secs(1));
    // Disk hook: the image's mount goes before the dir (its loop device
    // unbinds itself once unmounted).
    let _ = berth_shim::teardown::mounts::unmount_below(proc_root, &spec.dir);
    let _ = fs::remove_dir_all(&spec.dir);
    let _ = fs::remove_file(&spec.lease);
    if let Some(net) = &spec.network {
        let _ = fs::remove_file(&net.lease);
    }
}

/// The daemon's listener handed as fd 3 (socket activation).
const FD_ADDR: [&str; 2] = ["--addr", "fd://"];

fn daemon_args(ctx: &Ctx, dir: &Path, socket: &Path, root: &Path, listen_fd: bool) -> Vec<String> {
    let mut args = vec!["--addr".to_string(), format!("unix://{}", socket.display())];
    // Handoff hook (issue 15): the pod's listener too (fd 3); the daemon
    // serves every --addr, and readiness still probes the instance socket.
    if listen_fd {
        args.extend(FD_ADDR.map(String::from));
    }
    args.extend([
        "--root".to_string(),
        root.display().to_string(),
        "--config".to_string(),
        dir.join(buildkitd::FILE).display().to_string(),
        "--otel-socket-path".to_string(),
        dir.join(spec::RUN_DIR).join(buildkitd::OTEL_SOCKET).display().to_string(),
    ]);
    args.extend(ctx.run.daemon_args.iter().cloned());
    args
}

/// The daemon's whole environment: nothing of the agent's leaks in but the
/// PATH that `tools` built (the one runc was looked up on), and every
/// runtime path is the instance's own (buildkitd and runc otherwise share
/// host-wide paths such as /run/runc between instances).
fn daemon_env(id: &str, dir: &Path, path: &str) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), path.into()),
        ("HOME".into(), dir.join(spec::HOME_DIR).display().to_string()),
        ("XDG_RUNTIME_DIR".into(), dir.join(spec::RUN_DIR).display().to_string()),
        ("USER".into(), "berth".into()),
        ("BERTH_INSTANCE".into(), id.into()),
        // sd_notify READY=1 (notify.rs); buildkit's runc executor
        // drops it from runc's environment, so builds never see it.
        (notify::ENV.into(), notify::path(dir).display().to_string()),
    ]
}

/// The instance dir (root's, 0711 so the mapped root can reach its subdirs)
/// and the subdirs owned by the instance's root.
fn lay_out(spec: &Spec, config: &str) -> Result<(), SpawnError> {
    let at = |p: &Path| {
        let path = p.to_path_buf();
        move |source| SpawnError::Layout { path, source }
    };
    let mk = |p: &Path, mode: u32| -> Result<(), SpawnError> {
        fs::create_dir(p).map_err(at(p))?;
        sys::chmod(p, mode).map_err(at(p))
    };
    mk(&spec.dir, 0o711)?;
    spec.store().map_err(SpawnError::Spec)?;
    let cfg = spec.dir.join(buildkitd::FILE);
    fs::write(&cfg, config).map_err(at(&cfg))?;
    sys::chmod(&cfg, 0o644).map_err(at(&cfg))?;
    for sub in [spec::ROOT_DIR, spec::RUN_DIR, spec::HOME_DIR] {
        let p = spec.dir.join(sub);
        mk(&p, 0o700)?;
        sys::chown_path(&p, spec.ids.host_base, spec.ids.host_base).map_err(at(&p))?;
    }
    Ok(())
}

/// How an instance was found ready: its daemon's `READY=1` on the notify
/// socket, or a real gRPC call answered on its socket (older daemons, and
/// any that never notify).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyVia {
    Notify,
    Probe,
}

impl ReadyVia {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadyVia::Notify => "notify",
            ReadyVia::Probe => "probe",
        }
    }
}

/// Waits until the daemon says it is ready (`READY=1` on its notify socket)
/// or answers a real gRPC call on its socket (the socket file exists before
/// the daemon serves), whichever comes first, within the start timeout. On
/// failure the shim has ended and its outcome (with the daemon's stderr
/// tail) is returned with the error.
pub async fn wait_ready(
    ctx: &Arc<Ctx>,
    inst: &Arc<Instance>,
    shim: &mut Shim,
) -> Result<ReadyVia, (AdmitError, Option<Outcome>)> {
    let deadline = tokio::time::Instant::now() + ctx.run.start_timeout;
    let socket = inst.socket();
    // Dropped on return: the agent holds no descriptor of a running instance.
    let notify = shim.notify.take();
    let notified = async {
        match &notify {
            Some(n) => n.ready().await,
            None => std::future::pending().await,
        }
    };
    let probed = async {
        let started = Instant::now();
        loop {
            if socket.exists() && crate::probe::ready(&socket).await {
                return;
            }
            tokio::time::sleep(probe_interval(started.elapsed())).await;
            debug!(socket = %socket.display(), "waiting for the daemon");
        }
    };
    let ended = tokio::select! {
        // Biased: when both paths are ready at one poll, the notification
        // (which costs nothing to check) is the one recorded.
        biased;
        _ = notified => return Ok(ReadyVia::Notify),
        _ = probed => return Ok(ReadyVia::Probe),
        outcome = shim.ended() => Some(outcome),
        _ = tokio::time::sleep_until(deadline) => None,
    };
    Err(start_error(ctx, inst, shim, ended).await)
}

/// A start that did not get there: `Some(outcome)`, the shim ended first
/// (StartFailed, counted as the network's when it was); `None`, the start
/// timeout passed (NotReady, after stopping the shim). Returns the error
/// with the shim's outcome (its stderr tail goes into the error).
pub(crate) async fn start_error(
    ctx: &Ctx,
    inst: &Instance,
    shim: &mut Shim,
    ended: Option<Option<Outcome>>,
) -> (AdmitError, Option<Outcome>) {
    let tail = |o: &Option<Outcome>| o.as_ref().map(|o| with_hint(&o.stderr_tail)).unwrap_or_default();
    match ended {
        Some(outcome) => {
            let reason = match &outcome {
                Some(o) => describe_exit(o),
                None => "the shim died without a report".to_string(),
            };
            ctx.metrics.network.shim_failed(&reason);
            let tail = tail(&outcome);
            (AdmitError::StartFailed { id: inst.id.clone(), client: inst.client().display, reason, tail }, outcome)
        }
        None => {
            let outcome = shim.stop(ctx).await;
            let tail = tail(&outcome);
            (AdmitError::NotReady { id: inst.id.clone(), timeout: ctx.run.start_timeout, tail }, outcome)
        }
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
