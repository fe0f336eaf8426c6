//! fakekitd: a stand-in for buildkitd that the end-to-end suite runs inside
//! berth instances. It takes buildkitd's command line (using `--addr` and
//! `--root`, skipping the rest), serves grpc.health.v1, `berth.fake.v1.Fake`
//! and BuildKit's `Control.Info`/`ListWorkers` on its unix socket(s), and on
//! request writes files, plants symlinks, allocates memory, forks, hangs,
//! crashes or streams, so that limits, isolation and wipe are tested for real.
//!
//! It runs a current-thread tokio runtime: a pids limit counts threads too.
//! On SIGTERM/SIGINT it kills its Fork children, removes its sockets and exits
//! with status 1, as buildkitd does after a clean shutdown.

pub mod activation;
pub mod args;
pub mod bkconfig;
pub mod net;
pub mod notify;
pub mod pull;
pub mod service;

use crate::proto::control::control_server::ControlServer;
use crate::proto::fake::fake_server::FakeServer;
use service::{ControlService, FakeService, State};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};

/// The line `--version` prints (the format of buildkitd's).
pub const VERSION_LINE: &str = "fakekitd github.com/moby/buildkit v0.0.0-fake 0000000";

/// Hidden first argument: the process just sleeps (a Fork child).
pub const SLEEPER_ARG: &str = "--sleeper";

/// The binary's main: never returns.
pub fn main() -> ! {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some(SLEEPER_ARG) {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    let args = match args::parse(argv.iter().cloned()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fakekitd: {e}");
            std::process::exit(2);
        }
    };
    if args.version {
        println!("{VERSION_LINE}");
        std::process::exit(0);
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fakekitd: runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(run(args, argv));
    std::process::exit(code)
}

fn default_root() -> PathBuf {
    let uid = nix::unistd::getuid().as_raw();
    match std::env::var_os("HOME") {
        Some(h) if uid != 0 => PathBuf::from(h).join(".local/share/buildkit"),
        _ => PathBuf::from("/var/lib/buildkit"),
    }
}

fn default_addr() -> String {
    let uid = nix::unistd::getuid().as_raw();
    match std::env::var("XDG_RUNTIME_DIR") {
        Ok(x) if uid != 0 && !x.is_empty() => format!("unix://{x}/buildkit/buildkitd.sock"),
        _ => "unix:///run/buildkit/buildkitd.sock".to_string(),
    }
}

/// buildkitd's runc lookup: `buildkit-runc`, then `runc`, on PATH, taking
/// only what this process may execute; the one found is run once, so a
/// binary out of the daemon's reach fails here as it would for a build.
fn find_runc() -> Result<PathBuf, String> {
    use nix::unistd::{access, AccessFlags};
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = ["buildkit-runc", "runc"].iter().find_map(|name| {
        std::env::split_paths(&path).map(|d| d.join(name)).find(|c| c.is_file() && access(c, AccessFlags::X_OK).is_ok())
    });
    let Some(runc) = found else {
        return Err(format!("fakekitd: failed to find runc binary (PATH={})", path.to_string_lossy()));
    };
    match std::process::Command::new(&runc).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(runc),
        Ok(o) => Err(format!("fakekitd: {} --version: {}", runc.display(), o.status)),
        Err(e) => Err(format!("fakekitd: {}: {e}", runc.display())),
    }
}

/// Binds a unix listener at `path`, replacing a stale socket file (not any
/// other kind of file) and creating the parent dir.
fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    UnixListener::bind(path)
}

type Incoming = Pin<Box<dyn Stream<Item = io::Result<UnixStream>> + Send>>;

async fn run(args: args::Args, argv: Vec<String>) -> i32 {
    let mut term = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("fakekitd: signals: {e}");
            return 1;
        }
    };
    let addrs = if args.addrs.is_empty() { vec![default_addr()] } else { args.addrs.clone() };
    let mut paths = Vec::new();
    // `fd://`: the socket-activation listener (taken once, as buildkitd does).
    let mut activated = None;
    for a in &addrs {
        match a.strip_prefix("unix://") {
            Some(p) if !p.is_empty() => paths.push(PathBuf::from(p)),
            _ if a.starts_with("fd://") => match activation::listener(a) {
                Ok(l) if activated.is_none() => activated = Some(l),
                Ok(_) => {
                    eprintln!("fakekitd: --addr {a:?}: the activation listener is already served");
                    return 1;
                }
                Err(e) => {
                    eprintln!("fakekitd: {e}");
                    return 1;
                }
            },
            _ => {
                eprintln!("fakekitd: unsupported --addr {a:?}: only unix://<path> and fd:// are served");
                return 1;
            }
        }
    }
    let root = args.root.clone().unwrap_or_else(default_root);
    let exe = std::env::current_exe()
        .or_else(|_| std::fs::read_link("/proc/self/exe"))
        .unwrap_or_else(|_| PathBuf::from(std::env::args().next().unwrap_or_default()));
    let mut state = State::new(root.clone(), addrs.clone(), argv, berth_shim::host::random_hex(12), exe);
    if args.require_runc {
        match find_runc() {
            Ok(p) => state.runc = p.display().to_string(),
            Err(e) => {
                eprintln!("{e}");
                return 1;
            }
        }
    }
    let state = Arc::new(state);

    let serve = async {
        let mut listeners = Vec::new();
        if args.socket_early {
            for p in &paths {
                listeners.push(bind(p).map_err(|e| format!("listen {}: {e}", p.display()))?);
            }
        }
        if !args.start_delay.is_zero() {
            tokio::time::sleep(args.start_delay).await;
        }
        if let Some(msg) = &args.fail_start {
            eprintln!("{msg}");
            return Err(String::new());
        }
        std::fs::create_dir_all(&root).map_err(|e| format!("--root {}: {e}", root.display()))?;
        if !args.socket_early {
            for p in &paths {
                listeners.push(bind(p).map_err(|e| format!("listen {}: {e}", p.display()))?);
            }
        }
        let mut incoming: Option<Incoming> = None;
        listeners.extend(activated);
        for l in listeners {
            let s: Incoming = Box::pin(UnixListenerStream::new(l));
            incoming = Some(match incoming {
                None => s,
                Some(prev) => Box::pin(prev.merge(s)),
            });
        }
        let incoming = incoming.expect("at least one address");

        let mut builder = tonic::transport::Server::builder();
        let mut router = builder
            .add_service(
                FakeServer::new(FakeService(state.clone()))
                    .max_decoding_message_size(crate::grpc::MAX_MESSAGE)
                    .max_encoding_message_size(crate::grpc::MAX_MESSAGE),
            )
            .add_service(ControlServer::new(ControlService(state.clone())));
        if !args.no_health {
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter.set_serving::<FakeServer<FakeService>>().await;
            reporter.set_serving::<ControlServer<ControlService>>().await;
            if !args.health_delay.is_zero() {
                use tonic_health::ServingStatus::{NotServing, Serving};
                reporter.set_service_status("", NotServing).await;
                let (r, delay) = (reporter.clone(), args.health_delay);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    eprintln!("fakekitd: health now SERVING");
                    r.set_service_status("", Serving).await;
                });
            }
            router = router.add_service(health);
        }
        for a in &addrs {
            eprintln!("fakekitd: serving on {a}");
        }
        // As buildkitd: READY=1 once the listeners are bound, before serving.
        if !args.no_notify {
            notify::send("READY=1");
        }
        router.serve_with_incoming(incoming).await.map_err(|e| format!("serve: {}", crate::grpc::error_chain(&e)))
    };

    let res = tokio::select! {
        r = serve => r,
        _ = term.0.recv() => Ok(()),
        _ = term.1.recv() => Ok(()),
    };
    match res {
        // A signal: clean shutdown, exit status 1 like buildkitd's "context canceled".
        Ok(()) => {
            if !args.no_notify {
                notify::send("STOPPING=1");
            }
            state.kill_children();
            for p in &paths {
                let _ = std::fs::remove_file(p);
            }
            eprintln!("fakekitd: context canceled");
            1
        }
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("fakekitd: {msg}");
            }
            1
        }
    }
}
