//! One PATH truth (issue 17 item 3): `check` and `run` find the daemon and
//! runc the same way, the daemon gets the PATH runc was found on, and a
//! binary the instances' mapped ids cannot reach fails `check` and stops
//! `run` with the same message.
//!
//! The daemon is fakekitd behind a symlink named `buildkitd` (so runc is
//! required), run with `--require-runc`: it looks runc up on its own PATH
//! and runs it as the instance's mapped root, as buildkitd does.

use berth_tests::harness::{bin_path, run_fakeclient, scaled_flag, Agent};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SYSTEM_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// A temp tree every user can search (mode 0755), unlike tempdir's 0700.
fn tree() -> tempfile::TempDir {
    let t = tempfile::Builder::new().prefix("berth-path-").tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    t
}

fn fake_runc(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let runc = dir.join("runc");
    fs::write(&runc, "#!/bin/sh\necho 'runc version 1.1.12-fake'\n").unwrap();
    fs::set_permissions(&runc, fs::Permissions::from_mode(0o755)).unwrap();
    runc
}

/// `<dir>/buildkitd` -> fakekitd.
fn buildkitd_in(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let d = dir.join("buildkitd");
    std::os::unix::fs::symlink(bin_path("fakekitd"), &d).unwrap();
    d
}

/// A wrapper argv that runs its command in a mount namespace of its own
/// where every runc in the system dirs is covered by /dev/null (no longer a
/// file), so a test sees only the runc it planted, whatever the machine has.
fn hiding_system_runc() -> Vec<String> {
    let mut targets: Vec<PathBuf> = Vec::new();
    for dir in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        for name in ["buildkit-runc", "runc"] {
            if let Ok(p) = fs::canonicalize(Path::new(dir).join(name)) {
                if p.is_file() && !targets.contains(&p) {
                    targets.push(p);
                }
            }
        }
    }
    let mut script: Vec<String> = targets.iter().map(|t| format!("mount --bind /dev/null {}", t.display())).collect();
    script.push("exec \"$@\"".into());
    ["unshare", "--mount", "--propagation", "private", "sh", "-c", &script.join(" && "), "hide"]
        .map(String::from)
        .to_vec()
}

/// `berth-agent check --daemon <daemon>` with `PATH=<path>`: (exit code, output).
fn check(t: &Path, daemon: &Path, path: &str) -> (i32, String) {
    let wrap = hiding_system_runc();
    let out = Command::new(&wrap[0])
        .args(&wrap[1..])
        .arg(bin_path("berth-agent"))
        .arg("check")
        .arg("--daemon")
        .arg(daemon)
        .arg("--state-dir")
        .arg(t.join("state"))
        .arg("--shim")
        .arg(bin_path("berth-shim"))
        .env("PATH", path)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The detail of check's line for `name`, with its level.
fn line(out: &str, name: &str) -> (String, String) {
    let l = out
        .lines()
        .find(|l| l.get(6..).is_some_and(|r| r.starts_with(&format!("{name} "))))
        .unwrap_or_else(|| panic!("no {name} line:\n{out}"));
    (l[..4].trim().to_string(), l[6..].trim_start_matches(name).trim().to_string())
}

#[test]
fn runc_only_on_the_agents_path_reaches_the_daemon() {
    let t = tree();
    let runc = fake_runc(&t.path().join("bin"));
    let daemon = buildkitd_in(&t.path().join("kit"));
    let path = format!("{}:{SYSTEM_PATH}", t.path().join("bin").display());

    let (_, out) = check(t.path(), &daemon, &path);
    let (level, detail) = line(&out, "runc");
    assert_eq!(level, "ok", "{out}");
    assert!(detail.starts_with(&runc.display().to_string()), "{out}");
    assert_eq!(line(&out, "daemon").0, "ok", "{out}");

    let agent = Agent::builder("path-runc")
        .daemon(&daemon)
        .env("PATH", &path)
        .daemon_arg("--require-runc")
        .args(["--idle-timeout", &scaled_flag("1s")])
        .start();
    let r = run_fakeclient(agent.socket(), &["ping"]);
    assert!(r.ok(), "check said ok, but the daemon did not start: {r:?}\n{}", agent.log_tail(30));
    assert_eq!(r.json["runc"], runc.display().to_string(), "the daemon ran another runc");
    let daemon_path = r.json["path"].as_str().unwrap();
    assert!(daemon_path.split(':').any(|d| Path::new(d) == t.path().join("bin")), "{daemon_path}");
    let started = agent.wait_log(|v| v["message"] == "berth-agent starting", Duration::from_secs(5)).unwrap();
    assert_eq!(started["runc"], runc.display().to_string(), "{started}");
    agent.sigterm();
    assert!(agent.wait_exit(Duration::from_secs(30)).is_some());
    assert!(agent.wait_clean(Duration::from_secs(10)).is_empty());
}

/// `run` must stop at once, with the message `check` printed.
fn run_refuses_with(name: &str, daemon: &Path, path: &str, message: &str) {
    let agent = Agent::builder(name).daemon(daemon).env("PATH", path).wrapper(hiding_system_runc()).spawn();
    let status = agent.wait_exit(Duration::from_secs(30)).expect("run must refuse to start");
    assert!(!status.success());
    let lines = agent.log_lines().join("\n");
    assert!(lines.contains(&format!("berth-agent: {message}")), "run said:\n{lines}\ncheck said: {message}");
}

#[test]
fn a_daemon_out_of_the_mapped_ids_reach_fails_check_and_run_alike() {
    let t = tree();
    let home = t.path().join("home");
    let daemon = buildkitd_in(&home.join("bin"));
    fake_runc(&t.path().join("bin"));
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    let path = format!("{}:{SYSTEM_PATH}", t.path().join("bin").display());

    let (code, out) = check(t.path(), &daemon, &path);
    assert_eq!(code, 1, "{out}");
    let (level, detail) = line(&out, "daemon");
    assert_eq!(level, "FAIL", "{out}");
    assert!(detail.contains(&format!("{} has mode 700", home.display())) && detail.contains("EACCES"), "{out}");
    run_refuses_with("path-daemon-home", &daemon, &path, &detail);
}

#[test]
fn runc_out_of_the_mapped_ids_reach_fails_check_and_run_alike() {
    let t = tree();
    let home = t.path().join("home");
    fake_runc(&home.join("bin"));
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    let daemon = buildkitd_in(&t.path().join("kit"));
    let path = format!("{}:{SYSTEM_PATH}", home.join("bin").display());

    let (code, out) = check(t.path(), &daemon, &path);
    assert_eq!(code, 1, "{out}");
    let (level, detail) = line(&out, "runc");
    assert_eq!(level, "FAIL", "{out}");
    assert!(detail.contains(&format!("{} has mode 700", home.display())), "{out}");
    run_refuses_with("path-runc-home", &daemon, &path, &detail);
}
