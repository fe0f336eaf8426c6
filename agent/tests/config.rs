//! `--config FILE` through the real binary, in every documented form and
//! for each subcommand (issue 18 item 3): before or after the subcommand,
//! `--config F` or `--config=F`, or `BERTH_CONFIG`.

use std::path::Path;
use std::process::{Command, Output};

fn agent(args: &[&str], env_config: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth-agent"));
    c.args(args).env_remove("BERTH_CONFIG");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BERTH_") {
            c.env_remove(&k);
        }
    }
    if let Some(f) = env_config {
        c.env("BERTH_CONFIG", f);
    }
    c.output().unwrap()
}

fn forms<'a>(f: &'a str, eq: &'a str, sub: &'a str) -> Vec<Vec<&'a str>> {
    vec![vec!["--config", f, sub], vec![eq, sub], vec![sub, "--config", f], vec![sub, eq]]
}

/// One file for all three subcommands: a shape for capacity, limits, and a
/// daemon path that names itself in run's and check's output.
fn config(dir: &Path) -> String {
    let f = dir.join("berth.toml");
    let state = dir.join("state");
    std::fs::write(
        &f,
        format!("state-dir = {state:?}\n") + "node-memory = \"64Gi\"\nnode-cpus = 16\nbuild-memory = \"4Gi\"\nbuild-cpus = 2\nreserve-memory = \"2Gi\"\n\
         reserve-cpus = 1\ndaemon = \"/nonexistent/from-config/buildkitd\"\nlisten = [\"/nonexistent/from-config.sock\"]\n\
         http-addr = \"off\"\n",
    )
    .unwrap();
    f.display().to_string()
}

#[test]
fn capacity_reads_the_file_in_every_form() {
    let t = tempfile::tempdir().unwrap();
    let f = config(t.path());
    let eq = format!("--config={f}");
    let mut runs: Vec<(String, Output)> =
        forms(&f, &eq, "capacity").into_iter().map(|a| (format!("{a:?}"), agent(&a, None))).collect();
    runs.push(("BERTH_CONFIG".into(), agent(&["capacity"], Some(Path::new(&f)))));
    for (form, out) in runs {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{form}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        // 64Gi - 2Gi over 4Gi: 15; 16 - 1 CPUs over 2: 7.
        assert!(stdout.contains("slots:     7 (memory allows 15, CPU allows 7"), "{form}:\n{stdout}");
    }
}

#[test]
fn check_and_run_read_the_file_in_every_form() {
    let t = tempfile::tempdir().unwrap();
    let f = config(t.path());
    let eq = format!("--config={f}");
    for sub in ["check", "run"] {
        let mut runs: Vec<(String, Output)> =
            forms(&f, &eq, sub).into_iter().map(|a| (format!("{a:?}"), agent(&a, None))).collect();
        runs.push(("BERTH_CONFIG".into(), agent(&[sub], Some(Path::new(&f)))));
        for (form, out) in runs {
            let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(!all.contains("unexpected argument"), "{sub} {form}:\n{all}");
            // The daemon from the file is looked for (and is missing).
            assert!(all.contains("/nonexistent/from-config/buildkitd"), "{sub} {form}:\n{all}");
            assert_eq!(out.status.code(), Some(1), "{sub} {form}:\n{all}");
        }
    }
}

#[test]
fn a_key_no_subcommand_takes_is_an_error_naming_it() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("berth.toml");
    std::fs::write(&f, "build-memroy = \"4Gi\"\n").unwrap();
    let out = agent(&["--config", f.to_str().unwrap(), "capacity"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown key \"build-memroy\"") && err.contains("berth.toml"), "{err}");
}
