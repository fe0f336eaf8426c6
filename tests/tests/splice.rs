//! The node socket's proxy with splice(2) (issue 15, item 4): both
//! directions move through pipes, created only while bytes flow (invariant
//! 6: an idle connection holds no pipe), and every byte still arrives
//! (fakeclient's Echo checks the content that comes back). The
//! daemon-to-client direction walks the HTTP/2 frames it splices, so the
//! GOAWAY note still lands after a download, at a frame boundary.

use berth_tests::harness::{fakeclient, run_fakeclient, Agent};
use berth_tests::proto::fake::{ExitRequest, StreamChunk, StreamRequest};
use prost::Message;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the proxy keeps a drained direction's pipes (proxy/splice.rs
/// KEEP is 50 ms), with room for a loaded machine.
const PIPES_GONE: Duration = Duration::from_millis(500);

/// (pipes, sockets) among `pid`'s descriptors.
fn fd_kinds(pid: u32) -> (usize, usize) {
    let (mut pipes, mut socks) = (0, 0);
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.to_string_lossy();
                pipes += t.starts_with("pipe:") as usize;
                socks += t.starts_with("socket:") as usize;
            }
        }
    }
    (pipes, socks)
}

#[test]
fn idle_connections_hold_no_pipe_and_transfers_splice_intact() {
    let agent = Agent::builder("splice-fds")
        .args(["--max-builds", "2", "--idle-timeout", "30s", "--max-client-connections", "64"])
        .start();
    let pid = agent.agent_pid().expect("agent pid");
    let r = run_fakeclient(agent.socket(), &["--timeout", "25", "ping"]);
    assert!(r.ok(), "ping: {:?}\n{}", r.json, agent.log_tail(40));
    std::thread::sleep(Duration::from_millis(300));
    let (pipes0, socks0) = fd_kinds(pid);

    // 20 idle connections of the same client, proxied to its instance.
    let idle: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(agent.socket()).unwrap()).collect();
    let t0 = Instant::now();
    while fd_kinds(pid).1 < socks0 + 40 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "connections not proxied: {:?}\n{}",
            fd_kinds(pid),
            agent.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Each connection's SETTINGS went down through pipes; once drained for
    // a while, the connections hold none.
    std::thread::sleep(PIPES_GONE);
    let (pipes_idle, _) = fd_kinds(pid);
    assert_eq!(pipes_idle, pipes0, "idle connections must not hold pipes");

    // A transfer: 64 MiB each way; a pipe up and two down (the frame walk's
    // tee) show up while bytes flow, and Echo checks every byte that comes back.
    let mut cmd = fakeclient(agent.socket());
    cmd.args(["--timeout", "120", "echo", "64Mi", "1Mi"]).stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut most = pipes0;
    while child.try_wait().unwrap().is_none() {
        most = most.max(fd_kinds(pid).0);
    }
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success() && v.get("error").is_none(), "echo: {v}\n{}", agent.log_tail(30));
    assert_eq!(most, pipes0 + 6, "three pipes (six descriptors) while bytes flow both ways");
    drop(idle);
    std::thread::sleep(PIPES_GONE);
    assert_eq!(fd_kinds(pid).0, pipes0, "the pipe is gone once the transfer ended");
}

/// A gRPC request on a raw h2 connection; the body is sent whole.
async fn h2_call(
    socket: &Path,
    method: &str,
    msg: Vec<u8>,
) -> (
    Result<h2::RecvStream, h2::Error>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
    h2::client::SendRequest<bytes::Bytes>,
) {
    let (resp, _send, client, conn) = berth_tests::grpc::raw_fake_call(socket, method, &msg).await;
    let resp = tokio::time::timeout(Duration::from_secs(30), resp).await.expect("no response");
    (resp.map(|r| r.into_body()), conn, client)
}

/// Downloads a paced Fake.Stream through the agent, makes the daemon exit
/// (Fake.Exit on a second connection) once 8 MiB have arrived, and reads
/// on to the end. Every message that arrived is checked (contiguous
/// offsets, pattern content); returns the bytes received and what the
/// client saw of the end (body error, connection result).
async fn download_until_the_daemon_exits(socket: &Path) -> (u64, String) {
    let req = StreamRequest { total_bytes: 1 << 30, chunk_bytes: 64 << 10, delay_ms: 2 };
    let (body, conn, client) = h2_call(socket, "Stream", req.encode_to_vec()).await;
    let mut body = body.expect("Stream answers");
    let (mut buf, mut next, mut exit) = (Vec::<u8>::new(), 0u64, None);
    let end = loop {
        let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), body.data()).await.expect("stream stalls")
        else {
            break "the stream ended without an error".to_string();
        };
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => break format!("{e:?}"),
        };
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        // Whole gRPC messages: 1 flag byte, 4 length bytes, the message.
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            let m = StreamChunk::decode(&buf[5..5 + len]).expect("a whole StreamChunk");
            assert_eq!(m.offset, next, "messages arrive in order, none lost");
            assert!(m.data == berth_tests::pattern::chunk(m.offset, m.data.len()), "bytes at {} differ", m.offset);
            next += m.data.len() as u64;
            buf.drain(..5 + len);
        }
        if next >= 8 << 20 && exit.is_none() {
            let msg = ExitRequest { code: 3, message: "bye mid-download".into() }.encode_to_vec();
            let socket = socket.to_path_buf();
            exit = Some(tokio::spawn(async move { drop(h2_call(&socket, "Exit", msg).await) }));
        }
    };
    drop((body, client));
    let conn_end = tokio::time::timeout(Duration::from_secs(30), conn).await.expect("connection hangs").unwrap();
    if let Some(e) = exit {
        let _ = e.await;
    }
    (next, format!("body: {end}; connection: {conn_end:?}"))
}

/// The daemon-to-client splice keeps frame boundaries: a daemon that dies
/// while a download flows gets its GOAWAY note to the client, after every
/// byte it sent, intact. The daemon may die inside a frame (a write cut
/// short); then, by design, no note is written (the stream is not at a
/// boundary), the data must still be intact, and the test tries again:
/// with 64 KiB messages every 2 ms that is rare, three misses in a row
/// mean the walk lost a boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_note_lands_whole_after_a_spliced_download() {
    let agent = Agent::builder("splice-note")
        .args(["--max-builds", "2", "--idle-timeout", "30s", "--stop-grace", "1s"])
        .start_async()
        .await;
    let mut tries = Vec::new();
    for _ in 0..3 {
        let mark = agent.log_mark();
        let (got, seen) = download_until_the_daemon_exits(agent.socket()).await;
        assert!(got >= 8 << 20, "the download flowed before the exit: {got} bytes; {seen}");
        let noted = seen.contains("the daemon exited with status 3");
        tries.push(format!("{got} bytes, {seen}"));
        // The next try needs a fresh instance: this one's end is logged first.
        agent
            .wait_log_async(mark, berth_tests::harness::is_instance_end, Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("instance end not logged:\n{}", agent.log_tail(30)));
        if noted {
            assert!(seen.contains("GoAway"), "the note came as a GOAWAY: {seen}");
            let leaks = agent.wait_clean_async(Duration::from_secs(20)).await;
            assert!(leaks.is_empty(), "{leaks:?}");
            return;
        }
    }
    panic!("no GOAWAY note in three tries:\n{}\n{}", tries.join("\n"), agent.log_tail(30));
}
