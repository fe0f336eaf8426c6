//! Every rendered flag is one the agent accepts, and values reach them.

use super::*;

// ---------------------------------------------------------------------------
// Flags

/// The long flags `berth-agent run --help` lists.
fn agent_run_flags() -> BTreeSet<String> {
    let out = Command::new(bin_path("berth-agent")).args(["run", "--help"]).output().expect("run berth-agent");
    assert!(out.status.success(), "berth-agent run --help: {}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8_lossy(&out.stdout);
    let mut flags = BTreeSet::new();
    for line in help.lines() {
        let t = line.trim_start();
        // Option lines start with the flag(s); descriptions never do.
        if !t.starts_with('-') {
            continue;
        }
        for word in t.split([' ', ',', '[', '=']) {
            if let Some(name) = word.strip_prefix("--") {
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
                    flags.insert(name.to_string());
                }
            }
        }
    }
    assert!(flags.contains("drain-timeout") && flags.contains("csi-endpoint"), "help parse found {flags:?}");
    flags
}

#[test]
fn every_rendered_flag_is_one_the_agent_accepts() {
    let accepted = agent_run_flags();
    for (label, r) in both() {
        let args = r.agent_args();
        assert_eq!(args.first().map(String::as_str), Some("run"), "{label}: args start with the subcommand");
        let mut seen = BTreeSet::new();
        for a in &args[1..] {
            let name = a
                .strip_prefix("--")
                .unwrap_or_else(|| panic!("{label}: {a:?} is not a --flag (use --flag=value, one arg each)"))
                .split('=')
                .next()
                .unwrap();
            assert!(accepted.contains(name), "{label}: --{name} is not a `berth-agent run` flag ({accepted:?})");
            assert!(a.contains('='), "{label}: {a:?}: use --flag=value");
            if !["daemon-arg", "listen"].contains(&name) {
                assert!(seen.insert(name.to_string()), "{label}: --{name} given twice");
            }
        }
        // And the agent's own parser takes every value as rendered.
        parse_agent_args(label, &args);
        // The NODE_NAME env feeds --node-name; the chart does not hard-code it.
        assert!(r.flag("node-name").is_none(), "{label}");
    }
}

#[test]
fn values_reach_the_agent_flags() {
    let d = default_render();
    let c = custom_render();
    let want = |r: &Render, pairs: &[(&str, &str)]| {
        for (flag, value) in pairs {
            assert_eq!(r.flag(flag).as_deref(), Some(*value), "--{flag}");
        }
    };
    want(
        d,
        &[
            ("build-memory", "2Gi"),
            ("build-cpus", "1"),
            ("build-pids", "4096"),
            ("build-disk", "20Gi"),
            ("max-builds", "auto"),
            ("reserve-memory", "1Gi"),
            ("reserve-cpus", "500m"),
            ("reserve-disk", "10%"),
            ("idle-timeout", "30s"),
            ("start-timeout", "30s"),
            ("drain-timeout", "1h"),
            ("scope", "client"),
            ("csi-max-per-namespace", "0"),
            ("csi-driver-name", DRIVER),
            ("extended-resource-name", RESOURCE),
            ("publish-capacity", "true"),
            ("idmap-base", "1048576"),
            ("idmap-count", "16777216"),
            ("log-format", "json"),
        ],
    );
    assert!(d.flag("csi-allowed-namespaces").is_none(), "empty list: all namespaces, flag left out");
    assert!(d.flag("cgroup-parent").is_none());
    want(
        c,
        &[
            ("build-memory", "6Gi"),
            ("build-cpus", "2.5"),
            ("build-pids", "8192"),
            ("build-disk", "50Gi"),
            ("max-builds", "3"),
            ("reserve-cpus", "1"),
            ("reserve-disk", "15Gi"),
            ("warm", "1"),
            ("queue-size", "0"),
            ("queue-timeout", "90s"),
            ("idle-timeout", "5m"),
            ("start-timeout", "1m"),
            ("stop-grace", "5s"),
            ("scope", "connection"),
            ("csi-allowed-namespaces", "ci,builds"),
            ("csi-max-per-namespace", "4"),
            ("publish-capacity", "false"),
            ("extended-resource-name", "example.com/builds"),
            ("idmap-base", "16777216"),
            ("idmap-count", "4194304"),
            ("cgroup-parent", "berth.slice"),
            ("log-format", "text"),
        ],
    );
    let daemon_args: Vec<String> = c.agent_args().into_iter().filter(|a| a.starts_with("--daemon-arg=")).collect();
    assert_eq!(daemon_args, ["--daemon-arg=--oci-worker-gc-keepstorage=40000", "--daemon-arg=--debug"]);
    // Large integers render as integers, not floats in exponent form.
    assert!(c.agent_args().iter().all(|a| !a.contains("e+")), "{:?}", c.agent_args());
}
