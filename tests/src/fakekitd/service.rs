//! The gRPC services fakekitd serves: `berth.fake.v1.Fake` and the
//! `moby.buildkit.v1.Control` subset (Info, ListWorkers).

use crate::pattern;
use crate::proto::control::control_server::Control;
use crate::proto::control::types::{BuildkitVersion, WorkerRecord};
use crate::proto::control::{InfoRequest, InfoResponse, ListWorkersRequest, ListWorkersResponse};
use crate::proto::fake::fake_server::Fake;
use crate::proto::fake::*;
use crate::proto::pb::Platform;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub const VERSION_PACKAGE: &str = "github.com/moby/buildkit";
pub const VERSION: &str = "v0.0.0-fake";
pub const REVISION: &str = "0000000";
/// Largest Stream chunk fakekitd sends (clients must accept messages this big).
pub const MAX_CHUNK: u32 = 4 * 1024 * 1024 - 1024;

/// What the services share: fixed facts of this daemon and what it holds.
pub struct State {
    pub root: PathBuf,
    pub addrs: Vec<String>,
    pub args: Vec<String>,
    pub token: String,
    /// The runc found with `--require-runc` (empty without).
    pub runc: String,
    /// Path to re-exec for Fork children.
    pub exe: PathBuf,
    pub children: Mutex<Vec<Child>>,
    pub held: Mutex<Vec<Vec<u8>>>,
    held_bytes: AtomicU64,
    file_seq: AtomicU64,
}

impl State {
    pub fn new(root: PathBuf, addrs: Vec<String>, args: Vec<String>, token: String, exe: PathBuf) -> State {
        State {
            root,
            addrs,
            args,
            token,
            runc: String::new(),
            exe,
            children: Mutex::new(Vec::new()),
            held: Mutex::new(Vec::new()),
            held_bytes: AtomicU64::new(0),
            file_seq: AtomicU64::new(0),
        }
    }

    /// SIGKILLs and reaps every Fork child (on a clean shutdown).
    pub fn kill_children(&self) {
        let mut kids = self.children.lock().unwrap();
        for c in kids.iter_mut() {
            let _ = c.kill();
        }
        for c in kids.iter_mut() {
            let _ = c.wait();
        }
        kids.clear();
    }
}

#[derive(Clone)]
pub struct FakeService(pub Arc<State>);

#[derive(Clone)]
pub struct ControlService(pub Arc<State>);

fn read_trim(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn ns(name: &str) -> String {
    fs::read_link(format!("/proc/self/ns/{name}")).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn hostname() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A path relative to --root with no `..` and not absolute.
fn under_root(root: &Path, rel: &str, what: &str) -> Result<PathBuf, Status> {
    let p = Path::new(rel);
    if p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(Status::invalid_argument(format!("{what} {rel:?} must be relative to --root without '..'")));
    }
    Ok(root.join(p))
}

fn io_status(what: &str, e: io::Error) -> Status {
    let msg = format!("{what}: {e}");
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::ENOMEM) | Some(libc::EAGAIN) => {
            Status::resource_exhausted(msg)
        }
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => Status::permission_denied(msg),
        Some(libc::EEXIST) => Status::already_exists(msg),
        Some(libc::ENOENT) => Status::not_found(msg),
        _ => Status::internal(msg),
    }
}

/// The GOARCH/variant of this build, as BuildKit names platforms.
pub fn platform() -> Platform {
    let (arch, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", ""),
        "aarch64" => ("arm64", ""),
        "arm" => ("arm", "v7"),
        "x86" => ("386", ""),
        "powerpc64" => ("ppc64le", ""),
        "s390x" => ("s390x", ""),
        "riscv64" => ("riscv64", ""),
        other => (other, ""),
    };
    Platform {
        architecture: arch.to_string(),
        os: "linux".to_string(),
        variant: variant.to_string(),
        os_version: String::new(),
        os_features: Vec::new(),
    }
}

pub fn buildkit_version() -> BuildkitVersion {
    BuildkitVersion {
        package: VERSION_PACKAGE.to_string(),
        version: VERSION.to_string(),
        revision: REVISION.to_string(),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Fake for FakeService {
    async fn ping(&self, _req: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        let s = &self.0;
        Ok(Response::new(PingReply {
            pid: std::process::id(),
            ppid: nix::unistd::getppid().as_raw() as u32,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            uid_map: read_trim("/proc/self/uid_map"),
            gid_map: read_trim("/proc/self/gid_map"),
            ns_user: ns("user"),
            ns_pid: ns("pid"),
            ns_mnt: ns("mnt"),
            ns_ipc: ns("ipc"),
            ns_uts: ns("uts"),
            ns_net: ns("net"),
            ns_cgroup: ns("cgroup"),
            hostname: hostname(),
            root: s.root.to_string_lossy().into_owned(),
            home: env("HOME"),
            xdg_runtime_dir: env("XDG_RUNTIME_DIR"),
            user: env("USER"),
            token: s.token.clone(),
            args: s.args.clone(),
            cgroup: read_trim("/proc/self/cgroup"),
            addrs: s.addrs.clone(),
            children: s.children.lock().unwrap().len() as u32,
            held_bytes: s.held_bytes.load(Ordering::SeqCst),
            path: env("PATH"),
            runc: s.runc.clone(),
        }))
    }

    async fn write_files(&self, req: Request<WriteFilesRequest>) -> Result<Response<WriteFilesReply>, Status> {
        let r = req.into_inner();
        let dir = under_root(&self.0.root, &r.subdir, "subdir")?;
        fs::create_dir_all(&dir).map_err(|e| io_status(&format!("mkdir {}", dir.display()), e))?;
        let mut written = 0u64;
        let mut files = 0u32;
        let block = pattern::chunk(0, (r.size_bytes as usize).clamp(1, 1 << 20));
        for _ in 0..r.count {
            let n = self.0.file_seq.fetch_add(1, Ordering::SeqCst);
            let path = dir.join(format!("f-{n:06}"));
            let res = (|| -> io::Result<()> {
                let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
                let mut left = r.size_bytes;
                while left > 0 {
                    let k = (left as usize).min(block.len());
                    f.write_all(&block[..k])?;
                    written += k as u64;
                    left -= k as u64;
                }
                f.sync_all()
            })();
            if let Err(e) = res {
                return Err(io_status(&format!("write {} after {written} bytes in {files} files", path.display()), e));
            }
            files += 1;
        }
        Ok(Response::new(WriteFilesReply {
            bytes_written: written,
            files_written: files,
            dir: dir.to_string_lossy().into_owned(),
        }))
    }

    async fn symlink(&self, req: Request<SymlinkRequest>) -> Result<Response<SymlinkReply>, Status> {
        let r = req.into_inner();
        if r.link_name.is_empty() {
            return Err(Status::invalid_argument("link_name is empty"));
        }
        let path = under_root(&self.0.root, &r.link_name, "link_name")?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| io_status(&format!("mkdir {}", parent.display()), e))?;
        }
        std::os::unix::fs::symlink(&r.target, &path)
            .map_err(|e| io_status(&format!("symlink {} -> {}", path.display(), r.target), e))?;
        Ok(Response::new(SymlinkReply { path: path.to_string_lossy().into_owned() }))
    }

    async fn alloc(&self, req: Request<AllocRequest>) -> Result<Response<AllocReply>, Status> {
        let n = req.into_inner().bytes;
        let n = usize::try_from(n).map_err(|_| Status::invalid_argument("bytes too large"))?;
        let mut v: Vec<u8> = Vec::new();
        v.try_reserve_exact(n).map_err(|e| Status::resource_exhausted(format!("alloc {n} bytes: {e}")))?;
        // Write every byte (not one per page): the pages must be resident and
        // dirty, so the memory cgroup charges them and the OOM killer sees them.
        v.resize(n, 0xa5);
        std::hint::black_box(&v);
        self.0.held.lock().unwrap().push(v);
        let held = self.0.held_bytes.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        Ok(Response::new(AllocReply { ok: true, held_bytes: held }))
    }

    async fn fork(&self, req: Request<ForkRequest>) -> Result<Response<ForkReply>, Status> {
        let count = req.into_inner().count;
        let mut pids = Vec::new();
        let mut error = String::new();
        let mut kids = self.0.children.lock().unwrap();
        for _ in 0..count {
            // The root on the command line lets a leak scan find the sleepers.
            let res = Command::new(&self.0.exe)
                .arg("--sleeper")
                .arg("--root")
                .arg(&self.0.root)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            match res {
                Ok(c) => {
                    pids.push(c.id());
                    kids.push(c);
                }
                Err(e) => {
                    error = e.to_string();
                    break;
                }
            }
        }
        Ok(Response::new(ForkReply { started: pids.len() as u32, error, pids, held: kids.len() as u32 }))
    }

    async fn hang(&self, _req: Request<HangRequest>) -> Result<Response<HangReply>, Status> {
        std::future::pending::<()>().await;
        unreachable!()
    }

    async fn exit(&self, req: Request<ExitRequest>) -> Result<Response<ExitReply>, Status> {
        let r = req.into_inner();
        eprintln!("{}", r.message);
        std::process::exit(r.code);
    }

    type StreamStream = BoxStream<StreamChunk>;

    async fn stream(&self, req: Request<StreamRequest>) -> Result<Response<Self::StreamStream>, Status> {
        let r = req.into_inner();
        let chunk = if r.chunk_bytes == 0 { 64 * 1024 } else { r.chunk_bytes.min(MAX_CHUNK) } as u64;
        let delay = Duration::from_millis(r.delay_ms as u64);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut off = 0u64;
            while off < r.total_bytes {
                if off > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let n = (r.total_bytes - off).min(chunk);
                let msg = StreamChunk { offset: off, data: pattern::chunk(off, n as usize) };
                if tx.send(Ok(msg)).await.is_err() {
                    return; // the client went away
                }
                off += n;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type EchoStream = BoxStream<EchoMessage>;

    async fn echo(&self, req: Request<Streaming<EchoMessage>>) -> Result<Response<Self::EchoStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(m) = inbound.next().await {
                let done = m.is_err();
                if tx.send(m).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn read_path(&self, req: Request<ReadPathRequest>) -> Result<Response<ReadPathReply>, Status> {
        let r = req.into_inner();
        let max = if r.max_bytes == 0 { 65536 } else { r.max_bytes } as usize;
        Ok(Response::new(read_path(Path::new(&r.path), max)))
    }

    async fn dial(&self, req: Request<ConnectRequest>) -> Result<Response<ConnectReply>, Status> {
        Ok(Response::new(super::net::connect(req.into_inner()).await))
    }

    async fn bind(&self, req: Request<BindRequest>) -> Result<Response<BindReply>, Status> {
        let r = req.into_inner();
        Ok(Response::new(super::net::bind(r.port, r.hold_ms).await))
    }

    async fn resolve(&self, req: Request<ResolveRequest>) -> Result<Response<ResolveReply>, Status> {
        Ok(Response::new(super::net::resolve(&req.into_inner().name).await))
    }

    // --- bkconfig (issue 16): see bkconfig.rs ---
    async fn config(&self, _req: Request<ConfigRequest>) -> Result<Response<ConfigReply>, Status> {
        Ok(Response::new(super::bkconfig::config(&self.0.args)))
    }

    async fn open(&self, req: Request<OpenRequest>) -> Result<Response<OpenReply>, Status> {
        Ok(Response::new(super::bkconfig::open(&req.into_inner().path)))
    }

    // Registry fixture (issue 16): resolve an image with the --config's registry settings.
    async fn fetch_manifest(&self, req: Request<FetchManifestRequest>) -> Result<Response<FetchManifestReply>, Status> {
        Ok(Response::new(super::pull::fetch_manifest(&self.0.args, req.into_inner()).await))
    }
}

fn read_path(path: &Path, max: usize) -> ReadPathReply {
    let mut out = ReadPathReply::default();
    let res = (|| -> io::Result<()> {
        let md = fs::symlink_metadata(path)?;
        let ft = md.file_type();
        if ft.is_symlink() {
            out.kind = "symlink".into();
            out.link_target = fs::read_link(path)?.to_string_lossy().into_owned();
        } else if ft.is_dir() {
            out.kind = "dir".into();
            let mut names: Vec<String> = fs::read_dir(path)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<_>>()?;
            names.sort();
            out.entries = names;
        } else if ft.is_file() {
            out.kind = "file".into();
            use std::io::Read;
            let mut buf = Vec::new();
            fs::File::open(path)?.take(max as u64).read_to_end(&mut buf)?;
            out.data = buf;
        } else {
            out.kind = if ft.is_socket() { "socket" } else { "other" }.into();
        }
        Ok(())
    })();
    if let Err(e) = res {
        out.kind.clear();
        out.error = e.to_string();
    }
    out
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn list_workers(&self, _req: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        let labels = HashMap::from([
            ("org.mobyproject.buildkit.worker.executor".to_string(), "fake".to_string()),
            ("org.mobyproject.buildkit.worker.hostname".to_string(), hostname()),
            ("org.mobyproject.buildkit.worker.snapshotter".to_string(), "native".to_string()),
        ]);
        Ok(Response::new(ListWorkersResponse {
            record: vec![WorkerRecord {
                id: "fake".to_string(),
                labels,
                platforms: vec![platform()],
                buildkit_version: Some(buildkit_version()),
            }],
        }))
    }

    async fn info(&self, _req: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse { buildkit_version: Some(buildkit_version()) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_under_root() {
        let root = Path::new("/r");
        assert_eq!(under_root(root, "a/b", "x").unwrap(), PathBuf::from("/r/a/b"));
        assert_eq!(under_root(root, "", "x").unwrap(), PathBuf::from("/r"));
        assert!(under_root(root, "../etc", "x").is_err());
        assert!(under_root(root, "a/../../etc", "x").is_err());
        assert!(under_root(root, "/etc", "x").is_err());
    }

    #[test]
    fn read_path_reports_kinds_and_errors() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), b"hello").unwrap();
        std::os::unix::fs::symlink("/nowhere", d.path().join("l")).unwrap();
        let f = read_path(&d.path().join("f"), 3);
        assert_eq!((f.kind.as_str(), f.data.as_slice()), ("file", &b"hel"[..]));
        let l = read_path(&d.path().join("l"), 10);
        assert_eq!((l.kind.as_str(), l.link_target.as_str()), ("symlink", "/nowhere"));
        let dir = read_path(d.path(), 10);
        assert_eq!(dir.entries, vec!["f", "l"]);
        let missing = read_path(&d.path().join("missing"), 10);
        assert!(missing.kind.is_empty() && missing.error.contains("No such file"), "{missing:?}");
    }
}
