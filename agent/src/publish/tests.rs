use super::*;
use crate::config::{Cli, Command};
use serde_json::json;

#[test]
fn status_patch_escapes_tilde_then_slash() {
    let path = |r: &str| serde_json::to_value(status_patch(r, 1)).unwrap()[0]["path"].clone();
    assert_eq!(path("a~b/c"), "/status/capacity/a~0b~1c");
    // The order matters: "~1" in the input must not become "/".
    assert_eq!(path("x/~1"), "/status/capacity/x~1~01");
}

#[test]
fn status_patch_sets_capacity_and_allocatable() {
    // The same JSON on the wire as the hand-written pointers it replaced.
    assert_eq!(
        serde_json::to_value(status_patch("berth.dev/build", 7)).unwrap(),
        json!([
            {"op": "add", "path": "/status/capacity/berth.dev~1build", "value": "7"},
            {"op": "add", "path": "/status/allocatable/berth.dev~1build", "value": "7"},
        ])
    );
    // It round-trips through kube's JSON patch type.
    let back: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/status/capacity/berth.dev~1build", "value": "7"},
        {"op": "add", "path": "/status/allocatable/berth.dev~1build", "value": "7"},
    ]))
    .unwrap();
    assert_eq!(back, status_patch("berth.dev/build", 7));
}

#[test]
fn metadata_patch_has_labels_and_annotations() {
    let p = metadata_patch(4, 1);
    assert_eq!(p["metadata"]["labels"][LABEL_VERSION], env!("CARGO_PKG_VERSION"));
    assert_eq!(p["metadata"]["labels"][LABEL_ARCH], this_arch());
    assert_eq!(p["metadata"]["annotations"][ANNOTATION_SLOTS], "4");
    assert_eq!(p["metadata"]["annotations"][ANNOTATION_IN_USE], "1");
}

#[test]
fn arch_names_are_go_names() {
    assert_eq!(go_arch("x86_64"), "amd64");
    assert_eq!(go_arch("aarch64"), "arm64");
    assert_eq!(go_arch("s390x"), "s390x");
    assert_eq!(go_arch("riscv64"), "riscv64");
    assert!(["amd64", "arm64"].contains(&this_arch()) || !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")));
}

#[test]
fn resource_names() {
    assert!(parse_resource_name("berth.dev/build").is_ok());
    assert!(parse_resource_name("example.com/fast-build_2").is_ok());
    for bad in [
        "build",
        "berth.dev/",
        "/build",
        "Berth.dev/build",
        "kubernetes.io/build",
        "node.kubernetes.io/build",
        "requests.berth.dev/build",
        "berth.dev/-build",
        "berth.dev/a/b",
        "-berth.dev/build",
    ] {
        let e = parse_resource_name(bad).expect_err(bad);
        assert!(e.contains("berth.dev/build"), "{e}");
    }
}

#[test]
fn backoff_doubles_to_the_cap_with_bounded_jitter() {
    let ms = Duration::from_millis;
    let mut b = Backoff::new(ms(500), ms(30_000), false);
    let seq: Vec<_> = (0..9).map(|_| b.next_delay()).collect();
    assert_eq!(seq, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000].map(ms));
    b.reset();
    assert_eq!(b.next_delay(), ms(500));
    assert_eq!(b.at_cap(), ms(30_000));
    let mut j = Backoff::new(ms(500), ms(30_000), true);
    let mut expected = ms(500);
    let mut distinct = std::collections::HashSet::new();
    for _ in 0..20 {
        let d = j.next_delay();
        assert!(d >= expected / 2 && d <= expected, "{d:?} outside [{:?}, {expected:?}]", expected / 2);
        distinct.insert(d);
        expected = (expected * 2).min(ms(30_000));
    }
    assert!(distinct.len() > 10, "jitter does not spread: {distinct:?}");
}

#[test]
fn errors_are_classified() {
    let api = |code: u16| kube::Error::Api(kube::core::Status::failure("x", "y").with_code(code).boxed());
    assert_eq!(classify(&api(503)), Class::Transient);
    assert_eq!(classify(&api(500)), Class::Transient);
    assert_eq!(classify(&api(429)), Class::Transient);
    assert_eq!(classify(&api(403)), Class::Refused(403));
    assert_eq!(classify(&api(404)), Class::Refused(404));
    assert_eq!(classify(&kube::Error::Service("connection refused".into())), Class::Transient);
    assert!(fix_for(403, "n", "r").contains("nodes/status"));
    assert!(fix_for(404, "node-a", "r").contains("node-a"));
}

fn run_args(args: &[&str]) -> RunArgs {
    let mut argv = vec!["berth-agent", "run"];
    argv.extend_from_slice(args);
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Run(r) => *r,
        _ => unreachable!(),
    }
}

use clap::Parser;

#[test]
fn flags_decide_whether_and_what_to_publish() {
    // No node name anywhere: off, and the reason names NODE_NAME.
    let why = Settings::from_run(&run_args(&[]), None).unwrap_err();
    assert!(why.contains("NODE_NAME"), "{why}");
    // NODE_NAME (the downward API) turns it on.
    let s = Settings::from_run(&run_args(&[]), Some("node-a".into())).unwrap();
    assert_eq!((s.node.as_str(), s.resource.as_str()), ("node-a", "berth.dev/build"));
    // The flag wins over NODE_NAME.
    let s = Settings::from_run(&run_args(&["--node-name", "node-b"]), Some("node-a".into())).unwrap();
    assert_eq!(s.node, "node-b");
    // Explicitly off.
    let r = run_args(&["--node-name", "node-b", "--publish-capacity=false"]);
    assert!(Settings::from_run(&r, None).is_err());
    // Bare flag: on.
    let r = run_args(&["--node-name", "node-b", "--publish-capacity", "--extended-resource-name", "example.com/slot"]);
    let s = Settings::from_run(&r, None).unwrap();
    assert_eq!(s.resource, "example.com/slot");
    // An empty NODE_NAME is no name.
    assert!(Settings::from_run(&run_args(&[]), Some(" ".into())).is_err());
    let err = Cli::try_parse_from(["berth-agent", "run", "--extended-resource-name", "build"]).unwrap_err().to_string();
    assert!(err.contains("--extended-resource-name"), "{err}");
}

#[tokio::test]
async fn https_client_builds_with_the_ring_provider() {
    // Building a TLS client resolves rustls' crypto provider: this fails if
    // the feature set ever enables zero or two providers.
    let mut config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
    config.accept_invalid_certs = false;
    kube::Client::try_from(config).expect("a rustls client");
}

#[test]
fn config_file_can_turn_publishing_off() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("berth.toml");
    std::fs::write(&f, "node-name = \"node-c\"\npublish-capacity = \"false\"\n").unwrap();
    let argv = ["berth-agent", "run", "--config", f.to_str().unwrap()].map(std::ffi::OsString::from).to_vec();
    let cli = Cli::try_parse_from(crate::config::expand_config(argv).unwrap()).unwrap();
    let Command::Run(r) = cli.command else { unreachable!() };
    assert_eq!(r.node_name.as_deref(), Some("node-c"));
    assert_eq!(r.publish_capacity, Some(false));
    assert!(Settings::from_run(&r, None).is_err());
}
