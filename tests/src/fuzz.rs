//! The bodies of the fuzz targets (fuzz/fuzz_targets/*.rs call these), kept
//! here so that CI replays the committed corpus through the very same code
//! with a plain `#[test]` (tests/tests/fuzz_corpus.rs), without nightly or
//! sanitizers. Each body feeds outside input to a parser and checks what
//! must hold for any input: no panic, and the invariants noted inline.

use berth_agent::config::quantity;
use berth_agent::csi::target;
use berth_agent::proxy::Frames;
use std::collections::HashMap;
use std::path::{Component, Path};

/// Every target: (name, body). The corpus of `name` is `fuzz/corpus/<name>/`.
pub const TARGETS: [(&str, fn(&[u8])); 5] = [
    ("csi_request", csi_request),
    ("quantity", quantity),
    ("config_toml", config_toml),
    ("h2_frames", h2_frames),
    ("instance_files", instance_files),
];

/// A kubelet dir that does not exist, so `target_path` walks no real files.
const KUBELET: &str = "/nonexistent-berth-fuzz/kubelet";

/// CSI NodePublishVolume input: volume id, target path, volume context
/// (`key=value` lines), split by the first two NUL bytes.
pub fn csi_request(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let (vol, path, context) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if let Ok(v) = target::volume_id(vol) {
        // It becomes one directory name under the run dir.
        assert!(!v.contains('/') && v != "." && v != ".." && !v.is_empty(), "volume id {v:?}");
    }
    if let Ok(p) = target::target_path(Path::new(KUBELET), path) {
        assert!(p.starts_with(Path::new(KUBELET).join("pods")), "{p:?} escapes the pods dir");
        assert!(p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))), "{p:?}");
    }
    let ctx: HashMap<String, String> =
        context.lines().filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    if let Ok(pod) = target::Pod::from_context(&ctx) {
        assert!(!pod.uid.is_empty() && !pod.namespace.is_empty() && !pod.name.is_empty());
    }
}

/// Sizes, CPU amounts and durations, as flags and the config file give them.
pub fn quantity(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(b) = quantity::parse_bytes(s) {
        // What the agent logs must read back as a size.
        let shown = quantity::format_bytes(b);
        let again = quantity::parse_bytes(&shown).unwrap_or_else(|e| panic!("{s:?} -> {b} -> {shown:?}: {e}"));
        if !shown.contains('.') {
            assert_eq!(again, b, "{s:?} -> {shown:?}");
        }
    }
    if let Ok(m) = quantity::parse_millicpus(s) {
        assert!(m >= 1, "{s:?} gave {m} millicpus");
    }
    let _ = quantity::parse_millicpus_or_zero(s);
    let _ = humantime::parse_duration(s);
}

/// A TOML config file, through the same path `berth-agent --config` takes.
pub fn config_toml(data: &[u8]) {
    use std::ffi::OsString;
    thread_local! {
        static FILE: tempfile::NamedTempFile = tempfile::NamedTempFile::new().expect("temp file");
    }
    FILE.with(|f| {
        std::fs::write(f.path(), data).expect("write config");
        let argv: Vec<OsString> = vec!["berth-agent".into(), "run".into(), "--config".into(), f.path().into()];
        if let Ok(argv) = berth_agent::config::expand_config(argv) {
            let _ = <berth_agent::config::Cli as clap::Parser>::try_parse_from(argv);
        }
    });
}

/// The daemon-to-client byte stream the proxy watches for frame
/// boundaries: any split of the same bytes gives the same verdict, and that
/// verdict matches a plain walk over the frames.
pub fn h2_frames(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else { return };
    let cut = (cut as usize).min(rest.len());
    let mut whole = Frames::default();
    whole.feed(rest);
    let mut split = Frames::default();
    split.feed(&rest[..cut]);
    split.feed(&rest[cut..]);
    assert_eq!((whole.at_boundary(), whole.is_h2()), (split.at_boundary(), split.is_h2()));
    // Reference: a plain walk over whole frames, the first one SETTINGS.
    let (h2, boundary) = if rest.len() < 9 {
        (false, rest.is_empty())
    } else if rest[3] != 0x4 {
        (false, false)
    } else {
        let mut at = 0usize;
        while at + 9 <= rest.len() {
            at += 9 + (u32::from_be_bytes([0, rest[at], rest[at + 1], rest[at + 2]]) as usize);
        }
        (true, at == rest.len())
    };
    assert_eq!((whole.is_h2(), whole.at_boundary()), (h2, boundary), "on {} bytes", rest.len());
}

/// The files a sweep reads after a crash: spec.json, the pid stamps, and
/// the shim's outcome line.
pub fn instance_files(data: &[u8]) {
    use berth_shim::spec::{Outcome, PidStamp, Spec};
    if let Ok(spec) = serde_json::from_slice::<Spec>(data) {
        let _ = (spec.root_dir(), spec.run_dir(), spec.home_dir(), spec.socket());
        let again: Spec = serde_json::from_slice(&serde_json::to_vec(&spec).unwrap()).unwrap();
        assert_eq!(again, spec);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(p) = PidStamp::parse(s) {
            assert_eq!(PidStamp::parse(&p.render()), Some(p));
        }
        // recover.rs takes the last line that parses.
        let _ = s.lines().rev().find_map(|l| serde_json::from_str::<Outcome>(l).ok());
    }
}
