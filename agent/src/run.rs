//! The `run` command: validate the host, sweep, listen, and on SIGTERM stop
//! taking clients and end every instance before exiting.

use crate::config::RunArgs;
use crate::idmap::{IdPool, IdmapError};
use crate::{listen, recover, sys, Ctx};
use berth_shim::cgroup::{delegate, CgroupError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Tools(#[from] crate::spawn::tools::ToolsError),
    #[error("berth-shim not found beside {0} nor on PATH; pass --shim /path/to/berth-shim")]
    NoShim(PathBuf),
    #[error("state dir: {0}")]
    StateDir(String),
    #[error("disk limit: {0}")]
    Disk(String),
    #[error("cgroups: {0}")]
    Cgroup(#[source] CgroupError),
    #[error("id-map pool: {0}")]
    Idmap(#[source] IdmapError),
    #[error("listen: {0}")]
    Listen(#[source] listen::ListenError),
    #[error("--http-addr {0}: {1}")]
    Http(std::net::SocketAddr, std::io::Error),
    #[error("{0}")]
    Register(#[from] crate::register::RegisterError),
    #[error("signals: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    BuildkitdConfig(#[from] crate::bkconfig::BkConfigError),
    #[error("--build-network isolated: {0}")]
    Network(#[source] crate::network::NetworkError),
}

/// Looks `name` up like execvp would: a path with a slash is taken as is.
pub fn which(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|c| c.is_file()))
        .unwrap_or(None)
}

/// The shim: `--shim`, else beside the running agent, else on PATH.
pub fn find_shim(flag: Option<&Path>) -> Result<PathBuf, RunError> {
    let exe = std::env::current_exe().unwrap_or_default();
    if let Some(p) = flag {
        return which(p).ok_or_else(|| RunError::NoShim(p.to_path_buf()));
    }
    exe.parent()
        .map(|d| d.join("berth-shim"))
        .filter(|p| p.is_file())
        .or_else(|| which(Path::new("berth-shim")))
        .ok_or(RunError::NoShim(exe))
}

pub fn node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| nix::unistd::gethostname().ok().map(|h| h.to_string_lossy().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// Prepares the state dir: 0711 down to `instances/`, and every ancestor
/// searchable by the instances' mapped uids.
fn prepare_state(state: &Path) -> Result<(), RunError> {
    for dir in [state.to_path_buf(), state.join("instances")] {
        std::fs::create_dir_all(&dir).map_err(|e| RunError::StateDir(format!("{}: {e}", dir.display())))?;
        sys::chmod(&dir, 0o711).map_err(|e| RunError::StateDir(e.to_string()))?;
    }
    sys::check_traversable(state).map_err(RunError::StateDir)
}

/// What every start pays to put its daemon into its cgroup, said once at
/// start (`check` prints the same as its "cgroup moves" line). A shim that
/// finds clone3 refused all the same logs its own line with the reason.
fn log_cgroup_moves(cgroup_root: &Path, proc_root: &Path) {
    match berth_shim::cgroup::moves::view(cgroup_root, proc_root).summary() {
        (cost, true) => info!(fix = berth_shim::cgroup::moves::FAVOR_FIX, "cgroup moves: {cost}"),
        (cost, false) => info!("cgroup moves: {cost}"),
    }
}

pub async fn run(args: RunArgs) -> Result<(), RunError> {
    crate::bounds::raise_nofile();
    // The daemon, absolute (the shim execs it from inside the instance's
    // dir), runc and the daemon's PATH: found as `check` finds them.
    let tools = crate::spawn::tools::resolve(&args.host.daemon, std::env::var_os("PATH").as_deref())?;
    let shim = find_shim(args.host.shim.as_deref())?;
    crate::register::validate(&args)?;
    // bkconfig: the operator's fragment, refused at start if bad.
    let bkconfig = crate::bkconfig::Source::start(
        args.buildkitd_config.as_deref(),
        crate::spawn::gc_budget(args.limits.build_disk),
    )?;
    prepare_state(&args.host.state_dir)?;
    // cgroup delegation (issue 17): the agent's minimal move, undone on exit
    // (`delegation` is dropped, or undone and logged at the end of `run`).
    let (layout, mut delegation) =
        delegate::plan(&args.host.cgroup_root, &args.host.proc_root, args.host.cgroup_parent.as_deref())
            .and_then(|p| p.apply())
            .map_err(RunError::Cgroup)?;
    let pool = IdPool::new(
        args.host.idmap_base,
        args.host.idmap_count,
        args.host.state_dir.join("leases"),
        &args.host.etc_root,
    )
    .map_err(RunError::Idmap)?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        daemon = %tools.daemon.display(),
        runc = %tools.runc.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()),
        daemon_path = %tools.path,
        shim = %shim.display(),
        cgroup = ?layout.version,
        id_ranges = pool.capacity(),
        build_memory = args.limits.build_memory,
        build_millicpus = args.limits.build_cpus,
        build_pids = args.limits.build_pids,
        scope = ?args.scope,
        "berth-agent starting"
    );
    log_cgroup_moves(&args.host.cgroup_root, &args.host.proc_root);
    // Disk hook: without a way to give instances a disk limit, refuse to
    // start unless the operator said --build-disk 0.
    crate::disk::preflight(&args).map_err(RunError::Disk)?;
    let plan = crate::capacity::for_run(&args.limits, &args.capacity, &args.host);
    info!(
        slots = plan.slots,
        binding = ?plan.binding,
        node_memory = plan.node.memory,
        node_millicpus = plan.node.millicpus,
        reserve_memory = plan.reserve.memory,
        reserve_millicpus = plan.reserve.millicpus,
        slots_by_memory = plan.slots_by_memory,
        slots_by_cpu = plan.slots_by_cpu,
        slots_by_disk = plan.slots_by_disk,
        node_disk = plan.node.disk,
        reserve_disk = plan.reserve.disk,
        overcommitted = plan.overcommitted,
        "build slots"
    );
    // Never more slots than id ranges: each instance needs one.
    let slots_total = plan.slots.min(pool.capacity() as u64);
    let http = match args.http_addr.0 {
        Some(a) => Some(crate::http::bind(a).await.map_err(|e| RunError::Http(a, e))?),
        None => None,
    };
    // Isolated build network: forwarding, firewall, resolvers (see `network`).
    let network = crate::network::Network::start(&args.net, &args.host.state_dir, &args.host.proc_root)
        .await
        .map_err(RunError::Network)?;
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let (events, events_queue) = crate::reap::post::queue();
    let hangup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;
    let owner = crate::owner::Owner::acquire(&args.host.state_dir)
        .map_err(|e| RunError::StateDir(format!("agent lock: {e}")))?;
    // Spare disk images, made in the background from now on (see
    // `disk::spares`): the first start finds one ready.
    let spares = crate::disk::spares::Spares::start(&args.host.state_dir, &owner.id, args.limits.build_disk);
    let ctx = Arc::new(Ctx {
        node_name: args.node_name.clone().unwrap_or_else(node_name),
        layout,
        pool,
        shim,
        daemon: tools.daemon,
        daemon_path: tools.path,
        registry: crate::registry::Registry::new(args.start_failure_backoff),
        warm_wanted: tokio::sync::Notify::new(),
        draining: watch::Sender::new(false),
        shutdown: watch::Sender::new(false),
        tasks: TaskTracker::new(),
        metrics: crate::metrics::Metrics::new(),
        slots: Arc::new(tokio::sync::Semaphore::new(slots_total as usize)),
        slots_total,
        queued: std::sync::atomic::AtomicUsize::new(0),
        kubelet: watch::Sender::new(crate::register::Kubelet::Off),
        owner,
        spares,
        network,
        bounds: Default::default(),
        events,
        bkconfig,
        run: args,
    });
    ctx.bkconfig.publish(&ctx.metrics);
    tokio::spawn(crate::bkconfig::reload::watch(ctx.clone(), hangup));
    ctx.refresh_gauges();
    if let Some(l) = http {
        tokio::spawn(crate::http::serve(ctx.clone(), l));
    }
    recover::sweep(&ctx).await;
    tokio::spawn(crate::warm::keep_filled(ctx.clone()));
    let mut listeners = Vec::new();
    let mut owned = Vec::new();
    for path in &ctx.run.listen {
        let l = listen::bind(path, ctx.run.socket_mode).map_err(RunError::Listen)?;
        owned.extend(listen::inode(path).map(|i| (path.clone(), i)));
        listeners.push(tokio::spawn(listen::serve(
            ctx.clone(),
            l,
            path.clone(),
            listen::Source::Node,
            tokio_util::sync::CancellationToken::new(),
        )));
    }
    if let Some(endpoint) = ctx.run.csi_endpoint.clone() {
        let l = listen::bind(&endpoint, 0o600).map_err(RunError::Listen)?;
        owned.extend(listen::inode(&endpoint).map(|i| (endpoint.clone(), i)));
        let csi = crate::csi::Csi::new(ctx.clone());
        csi.recover();
        tokio::spawn(async move {
            if let Err(e) = crate::csi::serve(csi, l, endpoint).await {
                tracing::error!(error = %e, "CSI endpoint failed");
            }
        });
    }
    // Registration with kubelet after the CSI endpoint listens: kubelet calls
    // the endpoint named in GetInfo as soon as it has registered the driver.
    let registration = crate::register::spawn(&ctx);
    // Node extended resource, labels, annotations: a task of its own that
    // only logs, so the API being down never holds up serving builds.
    let _publisher = crate::publish::spawn(&ctx);
    // Why a pod's instance ended, as an Event on the pod: same rule.
    let events = crate::reap::post::spawn(&ctx, events_queue);
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = int.recv() => info!("SIGINT: draining"),
    }
    drain(&ctx, &mut term, &mut int).await;
    ctx.shutdown.send_replace(true);
    for l in listeners {
        let _ = l.await;
    }
    ctx.tasks.close();
    ctx.tasks.wait().await;
    if let Some(s) = &ctx.spares {
        s.close();
    }
    events.finish().await;
    if let Some(r) = registration {
        let _ = r.await;
    }
    // Remove our sockets, unless a newer agent has bound the path since.
    for (path, ino) in &owned {
        if listen::inode(path) == Some(*ino) {
            if let Err(e) = std::fs::remove_file(path) {
                warn!(socket = %path.display(), error = %e, "cannot remove socket");
            }
        }
    }
    for kept in delegation.undo() {
        warn!(what = %kept, "cgroup delegation not fully undone");
    }
    info!("all instances ended; bye");
    Ok(())
}

/// Stops taking new clients, lets running ones finish (their connections
/// close and their idle timeout passes), and returns when none is left, when
/// `--drain-timeout` runs out, or on a second SIGTERM/SIGINT.
async fn drain(ctx: &Arc<Ctx>, term: &mut tokio::signal::unix::Signal, int: &mut tokio::signal::unix::Signal) {
    ctx.draining.send_replace(true);
    let live = ctx.registry.clients();
    info!(instances = live, drain_timeout = ?ctx.run.drain_timeout, "draining: no new clients; running builds continue");
    let idle = async {
        while !ctx.tasks.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = idle => info!("drained: every client is done"),
        _ = tokio::time::sleep(ctx.run.drain_timeout) => warn!(drain_timeout = ?ctx.run.drain_timeout, "drain timeout: ending the remaining instances"),
        _ = term.recv() => warn!("second SIGTERM: ending every instance now"),
        _ = int.recv() => warn!("SIGINT while draining: ending every instance now"),
    }
}
