//! fakeclient: calls one RPC of fakekitd (directly or through berth) over a
//! unix socket and prints the reply as one JSON object on stdout.
//!
//! Exit status: 0 on success; 3 on a gRPC error (or a failed connect, or the
//! client `--timeout`), printed as `{"error":{"code":"<tonic Code name>","message":"..."}}`;
//! 2 on a usage error.

use berth_tests::grpc::{code_name, error_chain, try_channel, MAX_MESSAGE};
use berth_tests::pattern::{self, Checksum};
use berth_tests::proto::control::control_client::ControlClient;
use berth_tests::proto::control::{InfoRequest, ListWorkersRequest};
use berth_tests::proto::fake::fake_client::FakeClient;
use berth_tests::proto::fake::*;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "fakeclient", about = "Call one fakekitd RPC over a unix socket; prints JSON")]
struct Cli {
    /// The unix socket (fakekitd's, or berth's node socket).
    #[arg(long)]
    socket: PathBuf,
    /// Give up after this many seconds (prints a DeadlineExceeded error).
    #[arg(long)]
    timeout: Option<f64>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Fake.Ping: what the daemon sees of itself.
    Ping,
    /// grpc.health.v1.Health/Check for "".
    Health,
    /// Control.Info.
    Info,
    /// Control.ListWorkers.
    Workers,
    /// Fake.WriteFiles: COUNT files of SIZE bytes under <root>/SUBDIR.
    WriteFiles {
        count: u32,
        #[arg(value_parser = parse_size)]
        size: u64,
        #[arg(default_value = "")]
        subdir: String,
    },
    /// Fake.Symlink: <root>/LINK_NAME -> TARGET.
    Symlink { target: String, link_name: String },
    /// Fake.Alloc: allocate and hold BYTES (suffixes K, M, G, Ki, Mi, Gi).
    Alloc {
        #[arg(value_parser = parse_size)]
        bytes: u64,
    },
    /// Fake.Fork: start N sleeping children.
    Fork { n: u32 },
    /// Fake.Hang: never returns (use --timeout).
    Hang,
    /// Fake.Exit: the daemon prints MESSAGE to stderr and exits with CODE.
    Exit {
        #[arg(allow_hyphen_values = true)]
        code: i32,
        #[arg(default_value = "")]
        message: String,
    },
    /// Fake.Stream: receive TOTAL bytes in CHUNK-byte messages, DELAY_MS apart; checks the content.
    Stream {
        #[arg(value_parser = parse_size)]
        total: u64,
        #[arg(value_parser = parse_size)]
        chunk: u64,
        delay_ms: u32,
    },
    /// Fake.Echo: send TOTAL bytes in CHUNK-byte messages and check they come back.
    Echo {
        #[arg(value_parser = parse_size)]
        total: u64,
        #[arg(value_parser = parse_size)]
        chunk: u64,
    },
    /// Fake.ReadPath: read PATH as the daemon sees it.
    ReadPath { path: String },
    /// Fake.Connect: TCP-connect from the daemon's network to ADDRESS (ip:port), send SEND, read the answer.
    Connect {
        address: String,
        #[arg(long, default_value = "")]
        send: String,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u32,
    },
    /// Fake.Bind: bind PORT on all addresses inside the daemon's network.
    Bind { port: u32 },
    /// Fake.Resolve: resolve NAME as the daemon's processes do.
    Resolve { name: String },
    /// bkconfig: the daemon's --config file as it sees it.
    Config,
    /// bkconfig: open a path for reading as the daemon.
    Open { path: String },
}

/// `123`, `4K`, `4Ki`, `512M`, `2Gi` (K/M/G decimal, Ki/Mi/Gi binary).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "k" | "KB" => 1000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        _ => return Err(format!("invalid size unit in {s:?}")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} too large"))
}

/// A failed call: what to print under "error", plus extra top-level fields.
struct Failure {
    code: String,
    message: String,
    extra: Value,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        // The message plus its source chain: transport errors carry the
        // server's GOAWAY debug data (berth's reason an instance ended) there.
        let mut message = s.message().to_string();
        if let Some(src) = std::error::Error::source(&s) {
            message = format!("{message}: {}", error_chain(src));
        }
        Failure { code: code_name(s.code()), message, extra: json!({}) }
    }
}

fn fake(ch: Channel) -> FakeClient<Channel> {
    FakeClient::new(ch).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn call(cmd: Cmd, ch: Channel) -> Result<Value, Failure> {
    Ok(match cmd {
        Cmd::Ping => {
            let r = fake(ch).ping(PingRequest {}).await?.into_inner();
            json!({
                "pid": r.pid, "ppid": r.ppid, "uid": r.uid, "gid": r.gid,
                "uid_map": r.uid_map, "gid_map": r.gid_map,
                "ns": {"user": r.ns_user, "pid": r.ns_pid, "mnt": r.ns_mnt, "ipc": r.ns_ipc,
                       "uts": r.ns_uts, "net": r.ns_net, "cgroup": r.ns_cgroup},
                "hostname": r.hostname, "root": r.root,
                "home": r.home, "xdg_runtime_dir": r.xdg_runtime_dir, "user": r.user,
                "token": r.token, "args": r.args, "cgroup": r.cgroup, "addrs": r.addrs,
                "children": r.children, "held_bytes": r.held_bytes,
                "path": r.path, "runc": r.runc,
            })
        }
        Cmd::Health => {
            use tonic_health::pb::health_check_response::ServingStatus;
            let r = tonic_health::pb::health_client::HealthClient::new(ch)
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await?
                .into_inner();
            let name = ServingStatus::try_from(r.status).map(|s| s.as_str_name()).unwrap_or("UNKNOWN");
            json!({"status": name})
        }
        Cmd::Info => {
            let r = ControlClient::new(ch).info(InfoRequest {}).await?.into_inner();
            let v = r.buildkit_version.unwrap_or_default();
            json!({"buildkit_version": {"package": v.package, "version": v.version, "revision": v.revision}})
        }
        Cmd::Workers => {
            let r = ControlClient::new(ch).list_workers(ListWorkersRequest { filter: vec![] }).await?.into_inner();
            let workers: Vec<Value> = r
                .record
                .into_iter()
                .map(|w| {
                    let platforms: Vec<Value> = w
                        .platforms
                        .iter()
                        .map(|p| json!({"os": p.os, "architecture": p.architecture, "variant": p.variant}))
                        .collect();
                    json!({"id": w.id, "labels": w.labels, "platforms": platforms})
                })
                .collect();
            json!({"workers": workers})
        }
        Cmd::WriteFiles { count, size, subdir } => {
            let r = fake(ch).write_files(WriteFilesRequest { count, size_bytes: size, subdir }).await?.into_inner();
            json!({"bytes_written": r.bytes_written, "files_written": r.files_written, "dir": r.dir})
        }
        Cmd::Symlink { target, link_name } => {
            let r = fake(ch).symlink(SymlinkRequest { target, link_name }).await?.into_inner();
            json!({"path": r.path})
        }
        Cmd::Alloc { bytes } => {
            let r = fake(ch).alloc(AllocRequest { bytes }).await?.into_inner();
            json!({"ok": r.ok, "held_bytes": r.held_bytes})
        }
        Cmd::Fork { n } => {
            let r = fake(ch).fork(ForkRequest { count: n }).await?.into_inner();
            json!({"started": r.started, "error": r.error, "pids": r.pids, "held": r.held})
        }
        Cmd::Hang => {
            fake(ch).hang(HangRequest {}).await?;
            json!({})
        }
        Cmd::Exit { code, message } => {
            fake(ch).exit(ExitRequest { code, message }).await?;
            json!({})
        }
        Cmd::Stream { total, chunk, delay_ms } => {
            let start = Instant::now();
            let chunk_bytes = u32::try_from(chunk).map_err(|_| Failure {
                code: "InvalidArgument".into(),
                message: "chunk too large".into(),
                extra: json!({}),
            })?;
            let mut s =
                fake(ch).stream(StreamRequest { total_bytes: total, chunk_bytes, delay_ms }).await?.into_inner();
            let mut sum = Checksum::new();
            let mut chunks = 0u64;
            let mut in_order = true;
            let mut first_ms = None;
            while let Some(m) = s.next().await {
                match m {
                    Ok(c) => {
                        in_order &= c.offset == sum.len();
                        sum.update(&c.data);
                        chunks += 1;
                        first_ms.get_or_insert_with(|| ms(start.elapsed()));
                    }
                    Err(st) => {
                        let mut f = Failure::from(st);
                        f.extra = json!({"received_bytes": sum.len(), "chunks": chunks});
                        return Err(f);
                    }
                }
            }
            let expected = pattern::expected(total);
            json!({
                "bytes": sum.len(), "chunks": chunks, "in_order": in_order,
                "checksum": sum.hex(), "expected_checksum": expected.hex(),
                "ok": in_order && sum == expected,
                "first_chunk_ms": first_ms, "elapsed_ms": ms(start.elapsed()),
            })
        }
        Cmd::Echo { total, chunk } => {
            let start = Instant::now();
            let chunk = chunk.max(1);
            let outbound = tokio_stream::iter((0..total.div_ceil(chunk)).map(move |i| {
                let off = i * chunk;
                EchoMessage { data: pattern::chunk(off, (total - off).min(chunk) as usize) }
            }));
            let mut s = fake(ch).echo(outbound).await?.into_inner();
            let mut sum = Checksum::new();
            while let Some(m) = s.next().await {
                match m {
                    Ok(m) => sum.update(&m.data),
                    Err(st) => {
                        let mut f = Failure::from(st);
                        f.extra = json!({"received_bytes": sum.len()});
                        return Err(f);
                    }
                }
            }
            let secs = start.elapsed().as_secs_f64();
            json!({
                "bytes": sum.len(), "ok": sum == pattern::expected(total),
                "elapsed_ms": secs * 1000.0,
                "mib_per_s": if secs > 0.0 { sum.len() as f64 / (1 << 20) as f64 / secs } else { 0.0 },
            })
        }
        Cmd::Connect { address, send, timeout_ms } => {
            let r = fake(ch)
                .dial(ConnectRequest {
                    address,
                    send: send.into_bytes(),
                    timeout_ms,
                    discard: false,
                    source: String::new(),
                })
                .await?
                .into_inner();
            json!({"result": r.result, "error": r.error, "connect_ms": r.connect_ms, "received": String::from_utf8_lossy(&r.received)})
        }
        Cmd::Bind { port } => {
            let r = fake(ch).bind(BindRequest { port, hold_ms: 0 }).await?.into_inner();
            json!({"error": r.error, "address": r.address})
        }
        Cmd::Resolve { name } => {
            let r = fake(ch).resolve(ResolveRequest { name }).await?.into_inner();
            json!({"addresses": r.addresses, "error": r.error})
        }
        Cmd::ReadPath { path } => {
            let r = fake(ch).read_path(ReadPathRequest { path, max_bytes: 0 }).await?.into_inner();
            json!({
                "kind": r.kind, "data": String::from_utf8_lossy(&r.data), "size": r.data.len(),
                "entries": r.entries, "link_target": r.link_target, "error": r.error,
            })
        }
        Cmd::Config => {
            let r = fake(ch).config(ConfigRequest {}).await?.into_inner();
            json!({"path": r.path, "text": r.text, "error": r.error, "parse_error": r.parse_error})
        }
        Cmd::Open { path } => {
            let r = fake(ch).open(OpenRequest { path }).await?.into_inner();
            json!({"ok": r.ok, "errno": r.errno, "error": r.error, "size": r.size})
        }
    })
}

fn fail(f: Failure) -> ! {
    let mut v = json!({"error": {"code": f.code, "message": f.message}});
    if let (Some(o), Value::Object(extra)) = (v.as_object_mut(), f.extra) {
        o.extend(extra);
    }
    println!("{v}");
    std::process::exit(3)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let timeout = cli.timeout.map(Duration::from_secs_f64);
    let work = async {
        let ch = try_channel(&cli.socket).await.map_err(|e| Failure {
            code: code_name(tonic::Code::Unavailable),
            message: format!("connect {}: {}", cli.socket.display(), error_chain(&e)),
            extra: json!({"connect_failed": true}),
        })?;
        call(cli.cmd, ch).await
    };
    let res = match timeout {
        Some(t) => match tokio::time::timeout(t, work).await {
            Ok(r) => r,
            Err(_) => Err(Failure {
                code: code_name(tonic::Code::DeadlineExceeded),
                message: format!("client timeout after {t:?}"),
                extra: json!({"client_timeout": true}),
            }),
        },
        None => work.await,
    };
    match res {
        Ok(v) => println!("{v}"),
        Err(f) => fail(f),
    }
}
