//! The benchmark suite runs: `berth-bench --quick` (every figure, few
//! iterations, small sizes) exits 0 and prints a table with every figure
//! and numeric values. Timings are never asserted here: the bench measures,
//! this only proves it works. Build the binaries first (`cargo build
//! --workspace --bins`, same profile as the tests).

use berth_tests::harness::bin_path;
use serde_json::Value;
use std::process::Command;

const FIGURES: [&str; 11] = [
    "1 start",
    "2 throughput",
    "3 wipe",
    "4 footprint",
    "5 concurrency",
    "6 warm",
    "7 disk",
    "8 network",
    "9 flood",
    "10 sockdiag",
    "11 podsock",
];

/// The table's data rows as cells (`| a | b | ... |`), header and rule excluded.
fn table_rows(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .filter(|l| l.starts_with("| ") && l.ends_with(" |"))
        .map(|l| l.trim_matches('|').split(" | ").map(|c| c.trim().to_string()).collect::<Vec<_>>())
        .filter(|cells| cells.len() == 7 && cells[0] != "figure" && !cells[0].starts_with('-'))
        .collect()
}

/// The number a cell starts with (`12.3 ms`, `0.95x`, `0`).
fn number(cell: &str) -> Option<f64> {
    cell.split_whitespace().next()?.trim_end_matches('x').parse().ok()
}

#[test]
fn quick_bench_prints_every_figure_with_numbers() {
    let json = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(bin_path("berth-bench"))
        .arg("--quick")
        .arg("--json")
        .arg(json.path())
        .output()
        .expect("run berth-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "berth-bench --quick exited with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(!stdout.contains("ERROR"), "{stdout}");
    assert!(stderr.contains("figure realbuild: SKIPPED: opt-in"), "realbuild's skip is not said:\n{stderr}");

    let rows = table_rows(&stdout);
    for fig in FIGURES {
        let mine: Vec<&Vec<String>> = rows.iter().filter(|r| r[0] == fig).collect();
        assert!(!mine.is_empty(), "figure {fig:?} missing from the table:\n{stdout}");
        for r in &mine {
            let berth = number(&r[2]);
            assert!(
                berth.is_some_and(f64::is_finite),
                "figure {fig:?}: berth value {:?} is not a number:\n{stdout}",
                r[2]
            );
        }
        // Every figure compares with a baseline measured in the same run.
        assert!(
            mine.iter().any(|r| number(&r[3]).is_some() && number(&r[4]).is_some()),
            "figure {fig:?} has no row with a numeric baseline and ratio:\n{stdout}"
        );
    }

    // The JSON carries the same rows.
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(json.path()).unwrap()).unwrap();
    let figs: Vec<&str> = doc["rows"].as_array().unwrap().iter().filter_map(|r| r["figure"].as_str()).collect();
    for fig in FIGURES {
        assert!(figs.contains(&fig), "{fig} missing from the JSON rows: {figs:?}");
    }
    assert!(doc["errors"].as_array().unwrap().is_empty(), "{}", doc["errors"]);
}

/// Figure 12 needs the real buildkitd and buildctl, which CI lacks: a run
/// without `--only realbuild` says loudly that it is skipped, and naming it
/// without the tools is refused with the flags to give (never a silent pass).
#[test]
fn realbuild_is_opt_in_and_refused_without_the_real_tools() {
    let out = Command::new(bin_path("berth-bench")).args(["--quick", "--only", "realbuild"]).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    for flag in ["--buildkitd", "--buildctl", "--base-layout"] {
        assert!(stderr.contains(flag), "{flag} not named:\n{stderr}");
    }
    let out = Command::new(bin_path("berth-bench"))
        .args(["--quick", "--only", "realbuild", "--buildkitd", "/nonexistent/buildkitd", "--buildctl", "/bin/true"])
        .args(["--base-layout", "/nonexistent"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("--buildkitd /nonexistent/buildkitd: no such file"), "{stderr}");
}
