//! The operator's buildkitd.toml fragment (`--buildkitd-config`, issue 16)
//! end to end, with fakekitd telling what it was given: the instance sees
//! the merged config and its copied CA, another instance cannot open that
//! copy, a reload reaches the next instance and not a running one, a broken
//! file keeps the old one, and a bad fragment refuses the start with the
//! key, line and column.

use berth_tests::harness::{fakeclient, run_json, Agent, ClientRun};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2VydA==\n-----END CERTIFICATE-----\n";

/// The fragment's dir, with a CA file, as an operator's ConfigMap + Secret.
fn operator_files(mirror: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::Builder::new().prefix("berth-bkconf-").tempdir().unwrap();
    fs::write(d.path().join("ca.crt"), CERT).unwrap();
    let f = d.path().join("buildkitd.toml");
    fs::write(&f, fragment(d.path(), mirror)).unwrap();
    (d, f)
}

fn fragment(dir: &Path, mirror: &str) -> String {
    format!(
        "[registry.\"docker.io\"]\nmirrors = [\"{mirror}\"]\n\n[registry.\"{mirror}\"]\nhttp = true\ninsecure = true\n\n\
         [registry.\"registry.example:5000\"]\nca = [\"{}/ca.crt\"]\n",
        dir.display()
    )
}

fn call(agent: &Agent, uid: u32, args: &[&str]) -> ClientRun {
    let mut c = fakeclient(agent.socket());
    c.args(["--timeout", "30"]).args(args);
    std::os::unix::process::CommandExt::uid(&mut c, uid);
    std::os::unix::process::CommandExt::gid(&mut c, uid);
    run_json(c)
}

/// The instance's buildkitd.toml as fakekitd read it, parsed.
fn config_of(agent: &Agent, uid: u32) -> (String, toml::Table) {
    let r = call(agent, uid, &["config"]);
    assert!(r.ok(), "config: {:?} {}\n{}", r.json, r.stderr, agent.log_tail(30));
    let j = &r.json;
    assert_eq!(j["error"], "", "{j}");
    assert_eq!(j["parse_error"], "", "the merged config is valid TOML: {j}");
    let text = j["text"].as_str().unwrap().to_string();
    (text.clone(), toml::from_str(&text).unwrap())
}

fn mirror(t: &toml::Table) -> &str {
    t["registry"]["docker.io"]["mirrors"][0].as_str().unwrap()
}

fn hup(agent: &Agent) {
    let pid = agent.agent_pid().expect("agent running");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
}

fn reloaded(v: &Value) -> bool {
    v["message"].as_str().is_some_and(|m| m.starts_with("buildkitd config reloaded"))
}

#[test]
fn instances_get_the_merged_config_and_their_own_ca_copy_and_reloads_reach_new_ones() {
    let (dir, file) = operator_files("mirror-one.registry.svc:5000");
    let agent = Agent::builder("bkconf-e2e")
        .args([
            "--idle-timeout",
            "60s",
            "--socket-mode",
            "0666",
            "--build-disk",
            "0",
            "--max-builds",
            "6",
            "--drain-timeout",
            "2s",
        ])
        .arg("--buildkitd-config")
        .arg(&file)
        .start();
    assert!(
        agent.wait_log(|v| v["message"] == "buildkitd config loaded", Duration::from_secs(5)).is_some(),
        "the hash is logged at start: {}",
        agent.log_tail(20)
    );

    // Instance A: berth's keys and the operator's, merged.
    let (text_a, a) = config_of(&agent, 6101);
    assert_eq!(mirror(&a), "mirror-one.registry.svc:5000", "{text_a}");
    let plain = &a["registry"]["mirror-one.registry.svc:5000"];
    assert_eq!((plain["http"].as_bool(), plain["insecure"].as_bool()), (Some(true), Some(true)), "{text_a}");
    let grpc = a["grpc"]["address"][0].as_str().unwrap();
    assert!(grpc.starts_with("unix://") && grpc.contains("/instances/"), "berth's socket stays: {text_a}");
    assert!(a["root"].as_str().unwrap().contains("/instances/"), "{text_a}");
    // Its CA is a copy inside its own dir, readable by it.
    let ca = a["registry"]["registry.example:5000"]["ca"][0].as_str().unwrap().to_string();
    assert!(ca.starts_with(agent.state_dir().join("instances").to_str().unwrap()), "{ca}");
    assert!(ca.contains("/certs/"), "{ca}");
    let own = call(&agent, 6101, &["open", &ca]);
    assert_eq!(
        (own.json["ok"].as_bool(), own.json["size"].as_u64()),
        (Some(true), Some(CERT.len() as u64)),
        "{:?}",
        own.json
    );
    // The operator's own file is not where the instance reads it from.
    assert_ne!(ca, dir.path().join("ca.crt").display().to_string());

    // Instance B cannot open A's copy.
    let (_, b) = config_of(&agent, 6102);
    let ca_b = b["registry"]["registry.example:5000"]["ca"][0].as_str().unwrap();
    assert_ne!(ca_b, ca, "each instance has its own copy");
    let other = call(&agent, 6102, &["open", &ca]);
    assert_eq!(other.json["ok"].as_bool(), Some(false), "{:?}", other.json);
    assert_eq!(other.json["errno"].as_i64(), Some(libc::EACCES as i64), "{:?}", other.json);

    // A changed file (the 2 s poll, no signal) reaches the next instance
    // and not the running one.
    let mark = agent.log_mark();
    fs::write(&file, fragment(dir.path(), "mirror-two.registry.svc:5000")).unwrap();
    assert!(
        agent.wait_log_since(mark, reloaded, Duration::from_secs(15)).is_some(),
        "a file change is picked up: {}",
        agent.log_tail(20)
    );
    let (_, c) = config_of(&agent, 6103);
    assert_eq!(mirror(&c), "mirror-two.registry.svc:5000");
    let (_, a_again) = config_of(&agent, 6101);
    assert_eq!(mirror(&a_again), "mirror-one.registry.svc:5000", "the running instance keeps its config");

    // A broken file on SIGHUP: refused with line and column, the old one stays.
    let refused =
        refused_on_hup(&agent, &file, "[registry.\"docker.io\"]\nmirrors = [\"x\"\n\n[worker.oci]\n", "a broken file");
    let err = refused["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains(&format!("{}:", file.display())) && err.contains("not valid TOML"), "{refused}");
    let (_, d) = config_of(&agent, 6104);
    assert_eq!(mirror(&d), "mirror-two.registry.svc:5000", "the old fragment stays in force");

    // An owned key on SIGHUP: refused too, naming the key.
    let refused = refused_on_hup(&agent, &file, "[worker.oci]\nnoProcessSandbox = true\n", "an owned key");
    assert!(refused["error"].as_str().unwrap_or_default().contains("worker.oci.noProcessSandbox"), "{refused}");
    assert!(agent.pid().is_some(), "the agent keeps serving");

    agent.sigterm();
    assert!(agent.wait_exit(Duration::from_secs(60)).is_some(), "{}", agent.log_tail(20));
    // The copies went with the instance dirs.
    assert_eq!(agent.wait_clean(Duration::from_secs(20)), Vec::<String>::new());
    assert!(!Path::new(&ca).exists());
}

/// Starts an agent on `text` as its fragment; returns its exit code and output.
fn refused_start(name: &str, text: &str) -> (Option<i32>, String, PathBuf) {
    let (_dir, file) = operator_files("m");
    fs::write(&file, text).unwrap();
    let agent = Agent::builder(name).arg("--buildkitd-config").arg(&file).spawn();
    let status = agent.wait_exit(Duration::from_secs(30));
    let out = agent.log_tail(50);
    (status.and_then(|s| s.code()), out, file)
}

#[test]
fn a_bad_fragment_refuses_the_start_with_key_line_and_column() {
    let (code, out, file) = refused_start("bkconf-owned", "debug = true\n\n[worker.oci]\n  snapshotter = \"native\"\n");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("{}:4:3: key worker.oci.snapshotter is set by berth", file.display())), "{out}");

    let (code, out, file) =
        refused_start("bkconf-toml", "debug = true\n[registry.\"docker.io\"]\nmirrors = [\"a\" \"b\"]\n");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("{}:3:", file.display())) && out.contains("not valid TOML"), "{out}");

    let (code, out, file) = refused_start("bkconf-table", "[registries.\"docker.io\"]\nmirrors = [\"a\"]\n");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("{}:1:2: unknown table or key \"registries\"", file.display())), "{out}");

    let (code, out, _) =
        refused_start("bkconf-ca", "[registry.\"r.example\"]\nca = [\"/nonexistent/berth-bkconf/ca.pem\"]\n");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("/nonexistent/berth-bkconf/ca.pem") && out.contains("No such file"), "{out}");
}

#[test]
fn a_reload_retires_unclaimed_warm_instances() {
    let (dir, file) = operator_files("mirror-one.registry.svc:5000");
    let agent = Agent::builder("bkconf-warm")
        .args([
            "--warm",
            "1",
            "--max-builds",
            "3",
            "--socket-mode",
            "0666",
            "--build-disk",
            "0",
            "--drain-timeout",
            "2s",
        ])
        .arg("--buildkitd-config")
        .arg(&file)
        .start();
    let ready = |mark: usize| {
        agent.wait_log_since(
            mark,
            |v| v["message"] == "instance ready" && v["span"]["warm"] == true,
            Duration::from_secs(30),
        )
    };
    assert!(ready(0).is_some(), "a warm instance starts: {}", agent.log_tail(20));
    let mark = agent.log_mark();
    fs::write(&file, fragment(dir.path(), "mirror-two.registry.svc:5000")).unwrap();
    hup(&agent);
    assert!(agent.wait_log_since(mark, reloaded, Duration::from_secs(15)).is_some(), "{}", agent.log_tail(20));
    // The old warm instance ends and a fresh one, with the new fragment, replaces it.
    assert!(ready(mark).is_some(), "the pool refills: {}", agent.log_tail(20));
    let (text, t) = config_of(&agent, 6201);
    assert_eq!(mirror(&t), "mirror-two.registry.svc:5000", "a claimed warm instance has the new fragment: {text}");
    assert!(
        agent.log_lines().iter().any(|l| l.contains("claimed a warm instance")),
        "the client was served by the pool: {}",
        agent.log_tail(30)
    );
    agent.sigterm();
    assert!(agent.wait_exit(Duration::from_secs(60)).is_some(), "{}", agent.log_tail(20));
    assert_eq!(agent.wait_clean(Duration::from_secs(20)), Vec::<String>::new());
}

/// Writes `text` to the fragment, sends SIGHUP and returns the agent's
/// "buildkitd config refused" line (panics if none comes).
fn refused_on_hup(agent: &Agent, file: &Path, text: &str, what: &str) -> Value {
    let mark = agent.log_mark();
    fs::write(file, text).unwrap();
    hup(agent);
    agent
        .wait_log_since(
            mark,
            |v| v["message"].as_str().is_some_and(|m| m.starts_with("buildkitd config refused")),
            Duration::from_secs(15),
        )
        .unwrap_or_else(|| panic!("{what} is refused: {}", agent.log_tail(20)))
}
