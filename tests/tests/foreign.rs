//! Foreign gRPC clients get berth's answers. grpc C-core (Python grpcio),
//! grpc-java and Bazel send the socket path as the HTTP/2 `:authority` over
//! unix sockets, which the h2 server rejects (hyperium/h2#487); berth's
//! refusals are raw frames, so such a client gets the right status and
//! berth's message: RESOURCE_EXHAUSTED, UNAVAILABLE while draining, and a
//! start failure with the daemon's stderr.
//!
//! The client is the h2 crate itself; the h2 client cannot build a request
//! with such an authority (http's `Uri` rejects it), so its transport
//! rewrites each request's header block on the way out, to exactly what
//! grpc C-core 1.85 sends (`tmp%2Fx.sock`), or a bare path (`/run/x.sock`).
//! The answer is decoded by h2's own HPACK decoder.

use berth_tests::harness::{fakeclient, Agent};
use std::io;
use std::os::unix::process::CommandExt;
use std::pin::Pin;
use std::process::{Child, Stdio};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

const WAIT: Duration = Duration::from_secs(30);

/// A transport that replaces the header block of every HEADERS frame the
/// client sends with a gRPC request whose `:authority` is `authority`.
struct PathAuthority {
    inner: UnixStream,
    authority: Vec<u8>,
    /// Client bytes not yet framed.
    pending: Vec<u8>,
    /// Rewritten bytes not yet written.
    out: Vec<u8>,
    preface_done: bool,
}

fn literal(b: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    // Literal header field without indexing, new name, no Huffman; lengths < 127.
    b.push(0x00);
    b.push(name.len() as u8);
    b.extend_from_slice(name);
    b.push(value.len() as u8);
    b.extend_from_slice(value);
}

impl PathAuthority {
    fn new(inner: UnixStream, authority: &str) -> Self {
        PathAuthority { inner, authority: authority.into(), pending: vec![], out: vec![], preface_done: false }
    }

    fn block(&self) -> Vec<u8> {
        let mut b = Vec::new();
        literal(&mut b, b":method", b"POST");
        literal(&mut b, b":scheme", b"http");
        literal(&mut b, b":path", b"/moby.buildkit.v1.Control/ListWorkers");
        literal(&mut b, b":authority", &self.authority);
        literal(&mut b, b"content-type", b"application/grpc");
        literal(&mut b, b"te", b"trailers");
        literal(&mut b, b"user-agent", b"grpc-python/1.85.3 grpc-c/58.0.0 (linux; chttp2)");
        b
    }

    fn frame_pending(&mut self) {
        if !self.preface_done {
            if self.pending.len() < 24 {
                return;
            }
            self.out.extend(self.pending.drain(..24));
            self.preface_done = true;
        }
        while self.pending.len() >= 9 {
            let len = u32::from_be_bytes([0, self.pending[0], self.pending[1], self.pending[2]]) as usize;
            if self.pending.len() < 9 + len {
                return;
            }
            let frame: Vec<u8> = self.pending.drain(..9 + len).collect();
            if frame[3] == 0x1 {
                let block = self.block();
                self.out.extend_from_slice(&(block.len() as u32).to_be_bytes()[1..]);
                self.out.push(0x1);
                self.out.push(frame[4] & 0x5); // END_STREAM, END_HEADERS
                self.out.extend_from_slice(&frame[5..9]);
                self.out.extend_from_slice(&block);
            } else {
                self.out.extend_from_slice(&frame);
            }
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            self.out.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for PathAuthority {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PathAuthority {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.pending.extend_from_slice(buf);
        self.frame_pending();
        // Buffered either way; poll_flush finishes the write.
        let _ = self.poll_drain(cx)?;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The gRPC answer to one call: (grpc-status, decoded grpc-message).
#[derive(Debug)]
struct Answer {
    code: i32,
    message: String,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One unary call with the h2 crate, `:authority` rewritten to `authority`.
async fn call(socket: &std::path::Path, authority: &str) -> Answer {
    let stream = UnixStream::connect(socket).await.expect("connect");
    let (mut send, conn) = h2::client::handshake(PathAuthority::new(stream, authority)).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method("POST")
        .uri("http://localhost/moby.buildkit.v1.Control/ListWorkers")
        .body(())
        .unwrap();
    let (resp, mut body) = send.send_request(req, false).expect("send request");
    // An empty gRPC message: flag 0, length 0.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true).expect("send body");
    let resp = tokio::time::timeout(WAIT, resp).await.expect("no answer").expect("h2 response");
    assert_eq!(resp.status(), 200);
    let (parts, body) = resp.into_parts();
    let h = &parts.headers;
    assert_eq!(h.get("content-type").unwrap(), "application/grpc");
    assert!(body.is_end_stream(), "not a trailers-only answer");
    Answer {
        code: h.get("grpc-status").expect("grpc-status").to_str().unwrap().parse().unwrap(),
        message: percent_decode(h.get("grpc-message").map(|v| v.to_str().unwrap()).unwrap_or("")),
    }
}

/// Both forms seen in the field: C-core's escaped path and a bare one.
fn authorities(socket: &std::path::Path) -> [String; 2] {
    let s = socket.display().to_string();
    [s.trim_start_matches('/').replace('/', "%2F"), s]
}

fn hold_stream(agent: &Agent, uid: u32) -> Child {
    let mut cmd = fakeclient(agent.socket());
    cmd.args(["--timeout", "60", "stream", "4Mi", "64Ki", "45"]).uid(uid).gid(uid);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    cmd.spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_authority_gets_resource_exhausted_with_the_cap() {
    let agent = Agent::builder("foreign-cap")
        .args(["--max-builds", "2", "--max-client-connections", "1", "--http-addr", "off"])
        .start_async()
        .await;
    // This client's one allowed connection, held idle. connect() returns
    // once the kernel queued it, before the agent accepted it: wait until the
    // agent has taken it (its instance is up), or the call's connection may
    // be accepted first, take the one place and reach fakekitd's h2 server,
    // which resets a path authority (PROTOCOL_ERROR).
    let _held = UnixStream::connect(agent.socket()).await.unwrap();
    agent
        .wait_log_async(0, |v| v["message"] == "instance ready", WAIT)
        .await
        .unwrap_or_else(|| panic!("the held connection got no instance:\n{}", agent.log_tail(30)));
    for authority in authorities(agent.socket()) {
        let a = call(agent.socket(), &authority).await;
        assert_eq!(a.code, tonic::Code::ResourceExhausted as i32, "{authority}: {a:?}");
        assert!(a.message.starts_with("berth: client uid=0"), "{authority}: {a:?}");
        assert!(a.message.contains("--max-client-connections 1"), "{authority}: {a:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_authority_gets_draining() {
    let agent = Agent::builder("foreign-drain")
        .args(["--max-builds", "2", "--socket-mode", "0666", "--http-addr", "off"])
        .start_async()
        .await;
    let mut running = hold_stream(&agent, 2301);
    agent
        .wait_log_async(0, |v| v["message"] == "instance ready", WAIT)
        .await
        .unwrap_or_else(|| panic!("no instance:\n{}", agent.log_tail(30)));
    agent.sigterm();
    let drain = |v: &serde_json::Value| v["message"].as_str().is_some_and(|m| m.starts_with("draining"));
    agent.wait_log_async(0, drain, WAIT).await.expect("drain logged");
    for authority in authorities(agent.socket()) {
        let a = call(agent.socket(), &authority).await;
        assert_eq!(a.code, tonic::Code::Unavailable as i32, "{authority}: {a:?}");
        assert!(a.message.contains("is draining and takes no new builds"), "{authority}: {a:?}");
    }
    let _ = running.kill();
    let _ = running.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_authority_gets_the_start_failure_with_daemon_stderr() {
    let unique = format!("foreign-fail-{}", std::process::id());
    let agent = Agent::builder("foreign-fail")
        .args(["--max-builds", "2", "--http-addr", "off", "--start-failure-backoff", "30s"])
        .daemon_arg(&format!("--fail-start={unique}"))
        .start_async()
        .await;
    for authority in authorities(agent.socket()) {
        let a = call(agent.socket(), &authority).await;
        assert_eq!(a.code, tonic::Code::Unavailable as i32, "{authority}: {a:?}");
        assert!(a.message.contains("failed to start") && a.message.contains(&unique), "{authority}: {a:?}");
    }
}

/// A real C-core client, where Python's grpcio is installed (.ci/run
/// installs it). Missing grpcio is said loudly, not skipped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_gets_berths_refusal() {
    let probe = std::process::Command::new("python3").args(["-c", "import grpc"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: python3 with grpcio is not installed (pip install grpcio); h2-based tests above cover the same frames");
        return;
    }
    let agent = Agent::builder("foreign-py")
        .args(["--max-builds", "2", "--max-client-connections", "1", "--http-addr", "off"])
        .start_async()
        .await;
    let _held = UnixStream::connect(agent.socket()).await.unwrap();
    let script = r#"
import grpc, sys
ch = grpc.insecure_channel("unix://" + sys.argv[1])
f = ch.unary_unary("/moby.buildkit.v1.Control/ListWorkers")
try:
    f(b"", timeout=20)
    print("OK")
except grpc.RpcError as e:
    print(e.code().name)
    print(e.details())
"#;
    let socket = agent.socket().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3").args(["-c", script]).arg(socket).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("RESOURCE_EXHAUSTED"), "grpcio: {text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(lines.next().unwrap_or("").contains("--max-client-connections 1"), "{text}");
}
