//! Merge semantics: owned keys refused, operator keys kept verbatim, GC
//! clamped to the disk budget, file paths rewritten and files copied with
//! the right owner and mode, reload keeping the old fragment on error.

use super::rules::{disk_space, DiskSpace, OWNED};
use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2VydA==\n-----END CERTIFICATE-----\n";
const KEY: &str =
    "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";

fn frag(text: &str, budget: u64) -> Result<Fragment, BkConfigError> {
    parse(Path::new("/etc/berth/buildkitd.toml"), text, budget)
}

fn at(e: &BkConfigError) -> (usize, usize) {
    match e {
        BkConfigError::Syntax { line, column, .. }
        | BkConfigError::Unknown { line, column, .. }
        | BkConfigError::Owned { line, column, .. }
        | BkConfigError::Invalid { line, column, .. } => (*line, *column),
        other => panic!("no position in {other}"),
    }
}

#[test]
fn every_owned_key_is_refused_with_its_name_reason_and_position() {
    for (key, reason) in OWNED {
        let (table, last) = key.rsplit_once('.').unwrap_or(("", key));
        let text = if table.is_empty() {
            format!("debug = true\n{last} = \"x\"\n")
        } else {
            format!("debug = true\n[{table}]\n  {last} = \"x\"\n")
        };
        let e = frag(&text, 0).unwrap_err();
        let BkConfigError::Owned { key: k, reason: r, .. } = &e else { panic!("{key}: {e}") };
        assert_eq!(k, key);
        assert_eq!(r, reason);
        let want = if table.is_empty() { (2, 1) } else { (3, 3) };
        assert_eq!(at(&e), want, "{key}: {e}");
        assert_eq!(e.metric_label(), "owned_key");
        let shown = e.to_string();
        assert!(shown.contains("/etc/berth/buildkitd.toml:") && shown.contains(key), "{shown}");
    }
    // A whole owned table, written as a dotted key, inline or nested.
    let e = frag("grpc.address = [\"tcp://0.0.0.0:1\"]\n", 0).unwrap_err();
    assert!(matches!(&e, BkConfigError::Owned { key, .. } if key == "grpc"), "{e}");
    let e = frag("worker = { containerd = { enabled = true } }\n", 0).unwrap_err();
    assert!(matches!(&e, BkConfigError::Owned { key, .. } if key == "worker.containerd"), "{e}");
}

#[test]
fn unknown_tables_and_bad_toml_name_line_and_column() {
    let e = frag("debug = true\n\n  [regsitry.\"docker.io\"]\nmirrors = []\n", 0).unwrap_err();
    assert_eq!(e.metric_label(), "unknown_key");
    assert_eq!(at(&e), (3, 4), "{e}");
    assert!(e.to_string().contains("\"regsitry\"") && e.to_string().contains("registry"), "{e}");
    let e = frag("[worker.runc]\nx = 1\n", 0).unwrap_err();
    assert!(matches!(&e, BkConfigError::Unknown { key, .. } if key == "worker.runc"), "{e}");
    let e = frag("debug = true\n[registry.\"a\"]\nmirrors = [\"m\" \"n\"]\nhttp = true\n", 0).unwrap_err();
    assert_eq!(e.metric_label(), "syntax");
    assert_eq!(at(&e).0, 3, "{e}");
    assert!(e.to_string().contains("/etc/berth/buildkitd.toml:3:"), "{e}");
}

/// `merge` onto a table shaped like berth's generated one (spawn's own
/// tests render the real one with a fragment; this module may not import
/// spawn, which imports it).
fn merged(dir: &Path, f: &Fragment, gckeep: u64) -> Table {
    let d = dir.display();
    let mut base: Table = toml::from_str(&format!(
        "root = \"{d}/root\"\n[grpc]\naddress = [\"unix://{d}/run/buildkitd.sock\"]\n\
         [otel]\nsocketPath = \"{d}/run/otel-grpc.sock\"\n[worker.oci]\nenabled = true\ngc = true\n\
         gckeepstorage = \"{gckeep}\"\nmax-parallelism = 2\n[worker.containerd]\nenabled = false\n"
    ))
    .unwrap();
    merge(&mut base, f, dir);
    base
}

#[test]
fn operator_keys_are_kept_verbatim_beside_berths() {
    let text = r#"
debug = true
insecure-entitlements = ["network.host"]
[log]
format = "json"
[dns]
nameservers = ["10.96.0.10"]
[registry."docker.io"]
mirrors = ["mirror.registry.svc:5000"]
[registry."mirror.registry.svc:5000"]
http = true
insecure = true
[worker.oci]
platforms = ["linux/amd64"]
[[worker.oci.gcpolicy]]
filters = ["type==source.local"]
keepDuration = "48h"
all = false
[frontend."dockerfile.v0"]
enabled = true
"#;
    let f = frag(text, 8 << 30).unwrap();
    assert!(f.clamped.is_empty() && f.files.is_empty());
    let out = merged(Path::new("/var/lib/berth/instances/0123456789ab"), &f, 8 << 30);
    let given: Table = toml::from_str(text).unwrap();
    // Every operator key, as written.
    for k in ["debug", "insecure-entitlements", "log", "dns", "registry", "frontend"] {
        assert_eq!(out[k], given[k], "{k}");
    }
    let oci = &out["worker"]["oci"];
    assert_eq!(oci["platforms"], given["worker"]["oci"]["platforms"]);
    assert_eq!(oci["gcpolicy"], given["worker"]["oci"]["gcpolicy"]);
    // And berth's own, untouched.
    assert_eq!(oci["max-parallelism"].as_integer(), Some(2));
    assert_eq!(oci["gckeepstorage"].as_str(), Some("8589934592"));
    assert_eq!(out["worker"]["containerd"]["enabled"].as_bool(), Some(false));
    assert_eq!(out["root"].as_str(), Some("/var/lib/berth/instances/0123456789ab/root"));
    assert_eq!(
        out["grpc"]["address"].as_array().unwrap()[0].as_str(),
        Some("unix:///var/lib/berth/instances/0123456789ab/run/buildkitd.sock")
    );
}

#[test]
fn gc_sizes_are_clamped_to_the_budget() {
    let text = "[worker.oci]\ngckeepstorage = \"100GB\"\nmaxUsedSpace = 1024\nreservedSpace = \"90%\"\n\
                [[worker.oci.gcpolicy]]\nkeepBytes = 5000000000000\n[[worker.oci.gcpolicy]]\nmaxUsedSpace = \"512MB\"\n";
    let budget = 16u64 << 30;
    let f = frag(text, budget).unwrap();
    let oci = &f.table["worker"]["oci"];
    assert_eq!(oci["gckeepstorage"].as_str(), Some(budget.to_string().as_str()));
    assert_eq!(oci["maxUsedSpace"].as_integer(), Some(1024), "inside the budget: as written");
    assert_eq!(oci["reservedSpace"].as_str(), Some("90%"), "a percentage is of the instance's own disk");
    let p = oci["gcpolicy"].as_array().unwrap();
    assert_eq!(p[0]["keepBytes"].as_str(), Some(budget.to_string().as_str()));
    assert_eq!(p[1]["maxUsedSpace"].as_str(), Some("512MB"));
    assert_eq!(f.clamped.len(), 2, "{:?}", f.clamped);
    assert!(f.clamped[0].contains("worker.oci.gckeepstorage"), "{:?}", f.clamped);
    assert!(f.clamped[1].contains("worker.oci.gcpolicy[0].keepBytes"), "{:?}", f.clamped);
    // The clamped value reaches the instance's config.
    let out = merged(Path::new("/i"), &f, budget);
    assert_eq!(out["worker"]["oci"]["gckeepstorage"].as_str(), Some(budget.to_string().as_str()));
    // Unlimited disk: nothing clamped.
    assert!(frag(text, 0).unwrap().clamped.is_empty());
    // A size BuildKit would not read is refused with its position.
    let e = frag("[worker.oci]\n\ngckeepstorage = \"lots\"\n", budget).unwrap_err();
    assert_eq!((e.metric_label(), at(&e)), ("invalid", (3, 1)), "{e}");
}

#[test]
fn disk_space_reads_buildkits_forms() {
    let v = |s: &str| disk_space(&toml::Value::String(s.into()));
    assert_eq!(v("1024"), Ok(DiskSpace::Bytes(1024)));
    assert_eq!(v("10GB"), Ok(DiskSpace::Bytes(10 << 30)));
    assert_eq!(v("10g"), Ok(DiskSpace::Bytes(10 << 30)));
    assert_eq!(v("512MiB"), Ok(DiskSpace::Bytes(512 << 20)));
    assert_eq!(v("1.5k"), Ok(DiskSpace::Bytes(1536)));
    assert_eq!(v("50%"), Ok(DiskSpace::Percent(50)));
    assert_eq!(disk_space(&toml::Value::Integer(7)), Ok(DiskSpace::Bytes(7)));
    assert!(v("10 parsecs").is_err() && v("").is_err() && disk_space(&toml::Value::Boolean(true)).is_err());
}

fn certs_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("ca.crt"), CERT).unwrap();
    std::fs::write(d.path().join("client.key"), KEY).unwrap();
    std::fs::write(d.path().join("client.cert"), CERT).unwrap();
    std::fs::create_dir(d.path().join("tls")).unwrap();
    std::fs::write(d.path().join("tls/ca.crt"), CERT).unwrap();
    std::fs::write(d.path().join("tls/README"), "skipped").unwrap();
    d
}

#[test]
fn files_are_copied_with_the_instances_owner_and_paths_rewritten() {
    let src = certs_dir();
    let text = format!(
        "[registry.\"r.example:5000\"]\nca = [\"{0}/ca.crt\"]\nkeypair = [{{key = \"client.key\", cert = \"client.cert\"}}]\n\
         tlsconfigdir = [\"{0}/tls\"]\n",
        src.path().display()
    );
    // Relative paths are taken from the fragment's dir.
    let f = parse(&src.path().join("buildkitd.toml"), &text, 0).unwrap();
    assert_eq!(f.files.len(), 4, "{:?}", f.files);
    let inst = tempfile::tempdir().unwrap();
    let out = merged(inst.path(), &f, 0);
    let reg = &out["registry"]["r.example:5000"];
    let ca = reg["ca"][0].as_str().unwrap();
    assert_eq!(ca, inst.path().join("certs/0-r.example-5000/ca-0.crt").display().to_string().replace("-5000", "_5000"));
    let key = reg["keypair"][0]["key"].as_str().unwrap();
    let cert = reg["keypair"][0]["cert"].as_str().unwrap();
    let tls = reg["tlsconfigdir"][0].as_str().unwrap();
    for p in [ca, key, cert, tls] {
        assert!(p.starts_with(&inst.path().join(CERTS_DIR).display().to_string()), "{p}");
    }
    let uid = 1 << 20;
    files::install(inst.path(), uid, &f.files).unwrap();
    for (p, body) in [(ca, CERT), (key, KEY), (cert, CERT), (&format!("{tls}/ca.crt"), CERT)] {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!((m.uid(), m.gid(), m.permissions().mode() & 0o7777), (uid, uid, 0o400), "{p}");
        assert_eq!(std::fs::read_to_string(p).unwrap(), body, "{p}");
    }
    assert!(!Path::new(tls).join("README").exists(), "BuildKit reads *.crt, *.cert and *.key only");
    for d in [inst.path().join(CERTS_DIR), Path::new(ca).parent().unwrap().to_path_buf(), tls.into()] {
        let m = std::fs::metadata(&d).unwrap();
        assert_eq!((m.uid(), m.permissions().mode() & 0o7777), (uid, 0o500), "{}", d.display());
    }
    // The copies are what was read at load: a later change of the source
    // does not reach an instance of this fragment.
    std::fs::write(src.path().join("ca.crt"), "changed").unwrap();
    let inst2 = tempfile::tempdir().unwrap();
    files::install(inst2.path(), uid + 65536, &f.files).unwrap();
    assert_eq!(std::fs::read_to_string(inst2.path().join(&f.files[0].rel)).unwrap(), CERT);
}

#[test]
fn bad_files_are_named() {
    let src = certs_dir();
    let d = src.path().display();
    std::fs::write(src.path().join("ca.der"), [0x30u8, 0x82, 0x01, 0xb3, 0x30, 0x82]).unwrap();
    let e = frag(&format!("[registry.\"x\"]\nca = [\"{d}/ca.der\"]\n"), 0).unwrap_err();
    assert_eq!(e.metric_label(), "not_pem");
    assert!(e.to_string().contains("ca.der") && e.to_string().contains("DER"), "{e}");
    // A key where a CA belongs.
    let e = frag(&format!("[registry.\"x\"]\nca = [\"{d}/client.key\"]\n"), 0).unwrap_err();
    assert!(e.to_string().contains("\"PRIVATE KEY\" block"), "{e}");
    let e = frag("[registry.\"x\"]\nca = [\"/nonexistent/berth-ca.crt\"]\n", 0).unwrap_err();
    assert_eq!(e.metric_label(), "file");
    assert!(e.to_string().contains("/nonexistent/berth-ca.crt") && e.to_string().contains("registry.x.ca[0]"), "{e}");
    let e = frag(&format!("[registry.\"x\"]\nkeypair = [{{key = \"{d}/client.key\"}}]\n"), 0).unwrap_err();
    assert!(e.to_string().contains("cert is missing"), "{e}");
    let e = frag("[registry.\"x\"]\nca = \"/etc/ca.crt\"\n", 0).unwrap_err();
    assert_eq!((e.metric_label(), at(&e)), ("invalid", (2, 1)), "{e}");
}

#[test]
fn reload_swaps_a_good_file_and_keeps_the_old_one_on_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buildkitd.toml");
    std::fs::write(&path, "[registry.\"docker.io\"]\nmirrors = [\"one\"]\n").unwrap();
    let src = Source::start(Some(&path), 0).unwrap();
    let metrics = crate::metrics::Metrics::new();
    let first = src.current().unwrap();
    assert!(!src.changed());
    assert!(!src.reload(&metrics).unwrap(), "same content: nothing new");
    std::fs::write(&path, "[registry.\"docker.io\"]\nmirrors = [\"two\"]\n").unwrap();
    assert!(src.changed());
    assert!(src.reload(&metrics).unwrap());
    let second = src.current().unwrap();
    assert_ne!(first.hash, second.hash);
    assert_eq!(second.table["registry"]["docker.io"]["mirrors"][0].as_str(), Some("two"));
    // The fragment an instance took stays as it was.
    assert_eq!(first.table["registry"]["docker.io"]["mirrors"][0].as_str(), Some("one"));
    std::fs::write(&path, "[worker.oci]\nsnapshotter = \"native\"\n").unwrap();
    assert!(src.changed());
    assert_eq!(src.reload(&metrics).unwrap_err().metric_label(), "owned_key");
    assert!(!src.changed(), "a refused file is not reloaded again until it changes");
    assert_eq!(src.current().unwrap().hash, second.hash, "the old one stays in force");
    let text = metrics.encode();
    assert!(text.contains("berth_buildkitd_config_reloads_total{result=\"ok\"} 2"), "{text}");
    assert!(text.contains("berth_buildkitd_config_reloads_total{result=\"refused\"} 1"), "{text}");
    assert!(text.contains(&format!("berth_buildkitd_config_info{{sha256=\"{}\"}} 1", second.hash)), "{text}");
    assert!(!text.contains(&first.hash), "{text}");
    // A bad file at start refuses the start.
    std::fs::write(&path, "root = \"/x\"\n").unwrap();
    assert!(Source::start(Some(&path), 0).is_err());
    assert!(Source::start(None, 0).unwrap().current().is_none());
}

/// The README's example fragment is one the agent accepts (with its files
/// put in a temp dir), so the documented setup works as written.
#[test]
fn the_readme_example_is_accepted() {
    let readme = include_str!("../../../README.md");
    let section = &readme[readme.find("## Registry mirrors and private CAs").expect("README section")..];
    let start = section.find("```toml\n").expect("a toml block") + 8;
    let block = &section[start..start + section[start..].find("```").unwrap()];
    let d = tempfile::tempdir().unwrap();
    for (name, body) in [("corp-ca.crt", CERT), ("client.key", KEY), ("client.crt", CERT)] {
        std::fs::write(d.path().join(name), body).unwrap();
    }
    let text = block.replace("/etc/berth/buildkitd-certs", &d.path().display().to_string());
    let f = parse(Path::new("/etc/berth/buildkitd.toml"), &text, 16 << 30).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(f.files.len(), 3);
    assert_eq!(f.table["registry"]["docker.io"]["mirrors"][0].as_str(), Some("mirror.registry.svc.cluster.local:5000"));
}

/// `--buildkitd-config` in every form: flag, env, and the `--config` file,
/// for `run` and `check`.
#[test]
fn the_flag_comes_from_the_command_line_the_env_and_the_config_file() {
    use crate::config::{expand_config, Cli, Command};
    use clap::Parser;
    use std::ffi::OsString;
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("berth.toml");
    std::fs::write(&cfg, "buildkitd-config = \"/etc/berth/buildkitd/buildkitd.toml\"\n").unwrap();
    let of = |argv: &[&str]| -> Option<PathBuf> {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        match Cli::try_parse_from(expand_config(argv).unwrap()).unwrap().command {
            Command::Run(r) => r.buildkitd_config,
            Command::Check(c) => c.buildkitd_config,
            Command::Capacity(_) => panic!("capacity takes no fragment"),
        }
    };
    let want = Some(PathBuf::from("/etc/berth/buildkitd/buildkitd.toml"));
    let c = cfg.to_str().unwrap();
    assert_eq!(of(&["berth-agent", "--config", c, "run"]), want);
    assert_eq!(of(&["berth-agent", "check", "--config", c]), want);
    assert_eq!(of(&["berth-agent", "run", "--buildkitd-config", "/x.toml"]), Some(PathBuf::from("/x.toml")));
    // The same file serves `capacity`, which skips the key.
    let argv: Vec<OsString> = ["berth-agent", "--config", c, "capacity"].iter().map(OsString::from).collect();
    assert!(Cli::try_parse_from(expand_config(argv).unwrap()).is_ok());
    // And from the environment, for both.
    let cmd = <Cli as clap::CommandFactory>::command();
    for sub in ["run", "check"] {
        let sub = cmd.find_subcommand(sub).unwrap();
        let arg = sub.get_arguments().find(|a| a.get_long() == Some("buildkitd-config")).unwrap();
        assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some("BERTH_BUILDKITD_CONFIG"));
    }
}
