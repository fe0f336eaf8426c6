//! The node socket's proxy with splice(2) (issue 15, item 4): the
//! client-to-daemon direction moves through a pipe, created only while
//! bytes flow (invariant 6: an idle connection holds no pipe), and every
//! byte still arrives (fakeclient's Echo checks the content that comes back).

use berth_tests::harness::{fakeclient, run_fakeclient, Agent};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

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
    let (pipes_idle, _) = fd_kinds(pid);
    assert_eq!(pipes_idle, pipes0, "idle connections must not hold pipes");

    // A transfer: 64 MiB each way; the up direction's pipe shows up while
    // bytes flow, and Echo checks every byte that comes back.
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
    assert_eq!(most, pipes0 + 2, "one pipe (two descriptors) while the upload flows");
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fd_kinds(pid).0, pipes0, "the pipe is gone once the transfer ended");
}
