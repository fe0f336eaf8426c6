//! Errors are classified by what happened: a broken node file is INTERNAL
//! and names the path and the errno, never RESOURCE_EXHAUSTED (which tells
//! clients and schedulers the node is merely full); nothing is left behind
//! and the agent keeps serving once the file is fixed.

use berth_tests::harness::{fakeclient, run_fakeclient, run_json, Agent};
use std::fs;
use std::os::unix::process::CommandExt;
use std::time::Duration;

#[test]
fn an_unwritable_lease_dir_is_internal_and_names_the_path() {
    let agent = Agent::builder("err-lease")
        .args(["--max-builds", "2", "--socket-mode", "0666", "--idle-timeout", "200ms"])
        .start();
    let leases = agent.state_dir().join("leases");
    let away = agent.state_dir().join("leases.away");
    // Root writes through any mode, so the dir becomes a file: no lease can
    // be created below it (ENOTDIR), as on a broken or read-only disk.
    fs::rename(&leases, &away).unwrap();
    fs::write(&leases, "not a dir").unwrap();

    let run = run_fakeclient(agent.socket(), &["--timeout", "20", "ping"]);
    let restore = || {
        let _ = fs::remove_file(&leases);
        let _ = fs::rename(&away, &leases);
    };
    if run.error_code() != Some("Internal") {
        restore();
        panic!("expected an INTERNAL error, got {:?}\n{}", run.json, agent.log_tail(30));
    }
    let msg = run.error_message().unwrap_or_default().to_string();
    restore();
    assert!(msg.contains(&leases.display().to_string()), "names the lease path: {msg}");
    assert!(msg.contains("Not a directory"), "names the errno: {msg}");
    assert!(!msg.contains("builds running"), "does not claim the node is full: {msg}");
    assert!(
        agent.wait_log(|v| v["message"] == "instance could not be created", Duration::from_secs(10)).is_some(),
        "the agent logs the failure: {}",
        agent.log_tail(20)
    );

    // Nothing of the failed instance is left, and the slot came back: with
    // the dir fixed, another client is served.
    assert_eq!(agent.wait_clean(Duration::from_secs(10)), Vec::<String>::new());
    let mut next = fakeclient(agent.socket());
    next.args(["--timeout", "20", "ping"]).uid(5101).gid(5101);
    let served = run_json(next);
    assert!(served.ok(), "served after the fix: {:?} {}", served.json, served.stderr);
    assert_eq!(agent.wait_clean(Duration::from_secs(20)), Vec::<String>::new());
}
