//! The Helm chart (`chart/`), offline: rendered and linted by Helm's own engine
//! (PyPI's helm-python-sdk, Helm v4's Go SDK, through `tests/chart/helm_check.py`),
//! every rendered object validated strictly against the Kubernetes OpenAPI
//! schemas (PyPI's kubernetes-validate), and assertions on what matters: the
//! flags the agent accepts, the grace period against the drain timeout, mount
//! propagation, RBAC, the CSIDriver, the schema of the values, and the CI
//! examples under Pod Security "restricted".
//!
//! Nothing is skipped: without the Python packages every test fails and says
//! to run `pip install -r tests/requirements.txt`.

use berth_agent::config::{Cli, Command as AgentCommand};
use berth_tests::bin_path;
use clap::Parser;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The chart's default driver and extended resource names.
const DRIVER: &str = "berth.dev";
const RESOURCE: &str = "berth.dev/build";
/// Where every CI example mounts the berth volume, and the buildx line they use.
const SOCKET_DIR: &str = "/run/berth";
const BUILDX_REMOTE: &str = "--driver remote unix:///run/berth/buildkitd.sock";

// ---------------------------------------------------------------------------
// Running the helper

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `python3 tests/chart/helm_check.py <args>`: its JSON, or a panic saying what to do.
fn helm_check(args: &[&str]) -> Value {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let script = workspace().join("tests/chart/helm_check.py");
    let out = Command::new(&python).arg(&script).args(args).current_dir(workspace()).output().unwrap_or_else(|e| {
        panic!("cannot run {python} ({e}): install Python 3.11+, then `pip install -r tests/requirements.txt`")
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!("the chart tests need Python packages: {}", stderr.trim());
    }
    assert!(out.status.success(), "helm_check.py {args:?} failed ({}):\n{stderr}\n{stdout}", out.status);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("helm_check.py {args:?} printed no JSON ({e}):\n{stdout}\n{stderr}"))
}

/// A render: the objects (with their validation results) and NOTES.txt.
struct Render {
    objects: Vec<Value>,
    validation: Vec<(String, String, BTreeMap<String, String>)>,
    notes: String,
}

impl Render {
    fn from_json(v: Value) -> Render {
        assert_eq!(v["ok"], true, "render failed: {}", v["error"]);
        let mut objects = Vec::new();
        let mut validation = Vec::new();
        for o in v["objects"].as_array().expect("objects") {
            let obj = o["object"].clone();
            let by_version: BTreeMap<String, String> =
                serde_json::from_value(o["validation"].clone()).expect("validation map");
            validation.push((o["template"].as_str().unwrap_or("?").to_string(), id(&obj), by_version));
            objects.push(obj);
        }
        Render { objects, validation, notes: v["notes"].as_str().unwrap_or_default().to_string() }
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.of_kind(kind);
        assert_eq!(all.len(), 1, "expected one {kind}, got {}", all.len());
        all[0]
    }

    fn daemonset(&self) -> &Value {
        self.one("DaemonSet")
    }

    fn pod_spec(&self) -> &Value {
        &self.daemonset()["spec"]["template"]["spec"]
    }

    fn container(&self, name: &str) -> &Value {
        containers(self.pod_spec())
            .into_iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name} in the DaemonSet"))
    }

    fn agent_args(&self) -> Vec<String> {
        strings(&self.container("berth-agent")["args"])
    }

    /// The value of `--name=value` in the agent's args (the last one).
    fn flag(&self, name: &str) -> Option<String> {
        let prefix = format!("--{name}=");
        self.agent_args().iter().rev().find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
    }
}

fn render(extra: &[&str]) -> Render {
    let mut args = vec!["render"];
    args.extend_from_slice(extra);
    Render::from_json(helm_check(&args))
}

fn custom_values() -> String {
    workspace().join("tests/chart/values-custom.yaml").display().to_string()
}

/// Defaults and tests/chart/values-custom.yaml, rendered once per test binary.
fn default_render() -> &'static Render {
    static R: OnceLock<Render> = OnceLock::new();
    R.get_or_init(|| render(&[]))
}

fn custom_render() -> &'static Render {
    static R: OnceLock<Render> = OnceLock::new();
    R.get_or_init(|| render(&["--values", &custom_values()]))
}

fn both() -> [(&'static str, &'static Render); 2] {
    [("defaults", default_render()), ("values-custom.yaml", custom_render())]
}

/// A render that must fail: the error text.
fn render_error(values: Value) -> String {
    let v = helm_check(&["render", "--set-json", &values.to_string()]);
    assert_eq!(v["ok"], false, "values {values} rendered, but must be rejected");
    format!("{}: {}", v["error_type"].as_str().unwrap_or("?"), v["error"].as_str().unwrap_or("?"))
}

// ---------------------------------------------------------------------------
// Small JSON helpers

fn id(o: &Value) -> String {
    format!("{}/{}", o["kind"].as_str().unwrap_or("?"), o["metadata"]["name"].as_str().unwrap_or("?"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

fn arr(v: &Value) -> Vec<&Value> {
    v.as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

/// Every container of a pod spec: init, regular and ephemeral.
fn containers(spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers", "ephemeralContainers"].iter().flat_map(|k| arr(&spec[*k])).collect()
}

fn volume<'a>(spec: &'a Value, name: &str) -> &'a Value {
    arr(&spec["volumes"])
        .into_iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name} in {}", spec["volumes"]))
}

/// Seconds of an h/m/s duration (`1h30m`), the only units the chart admits for the drain.
fn seconds(d: &str) -> u64 {
    hms_secs(d).unwrap_or_else(|| panic!("{d:?} is not a duration"))
}

fn hms_secs(d: &str) -> Option<u64> {
    // The chart admits h, m and s units only (values.schema.json).
    let mut total = 0u64;
    let mut num = String::new();
    for ch in d.chars() {
        if ch.is_ascii_digit() {
            num.push(ch);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        total += n * match ch {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
    }
    num.is_empty().then_some(total)
}

// ---------------------------------------------------------------------------
// Pod Security "restricted" (https://kubernetes.io/docs/concepts/security/pod-security-standards/)

/// What keeps `spec` (a pod spec) from Pod Security "restricted", latest version:
/// baseline (no host namespaces, privileged, hostPath, host ports, added
/// capabilities, unsafe sysctls, custom SELinux, proc mount, Unconfined
/// seccomp/AppArmor) and restricted (volume types, allowPrivilegeEscalation
/// false, runAsNonRoot, no uid 0, seccomp RuntimeDefault/Localhost, drop ALL).
fn restricted_violations(spec: &Value) -> Vec<String> {
    let mut v = Vec::new();
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[host] == true {
            v.push(format!("spec.{host} is true"));
        }
    }
    const VOLUME_TYPES: [&str; 8] =
        ["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"];
    for vol in arr(&spec["volumes"]) {
        let name = vol["name"].as_str().unwrap_or("?");
        let kinds: Vec<&String> =
            vol.as_object().map(|m| m.keys().filter(|k| *k != "name").collect()).unwrap_or_default();
        if kinds.len() != 1 {
            v.push(format!("volume {name}: expected one volume source, got {kinds:?}"));
        }
        for k in kinds {
            if !VOLUME_TYPES.contains(&k.as_str()) {
                v.push(format!("volume {name}: type {k} is not allowed"));
            }
        }
    }
    let psc = &spec["securityContext"];
    const SAFE_SYSCTLS: [&str; 6] = [
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
    ];
    for s in arr(&psc["sysctls"]) {
        let name = s["name"].as_str().unwrap_or("?");
        if !SAFE_SYSCTLS.contains(&name) {
            v.push(format!("sysctl {name} is not allowed"));
        }
    }
    if psc["runAsUser"] == 0 {
        v.push("spec.securityContext.runAsUser is 0".into());
    }
    let seccomp_ok = |sc: &Value| matches!(sc["seccompProfile"]["type"].as_str(), Some("RuntimeDefault" | "Localhost"));
    if psc["seccompProfile"]["type"] == "Unconfined" {
        v.push("pod seccompProfile is Unconfined".into());
    }
    if psc["appArmorProfile"]["type"] == "Unconfined" {
        v.push("pod appArmorProfile is Unconfined".into());
    }
    check_selinux("pod", &psc["seLinuxOptions"], &mut v);
    if psc["windowsOptions"]["hostProcess"] == true {
        v.push("pod windowsOptions.hostProcess is true".into());
    }
    let cs = containers(spec);
    if cs.is_empty() {
        v.push("no containers".into());
    }
    for c in cs {
        let name = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            v.push(format!("{name}: privileged"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            v.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        let drops = strings(&sc["capabilities"]["drop"]);
        if !drops.iter().any(|d| d == "ALL") {
            v.push(format!("{name}: capabilities.drop lacks ALL"));
        }
        for add in strings(&sc["capabilities"]["add"]) {
            if add != "NET_BIND_SERVICE" {
                v.push(format!("{name}: adds capability {add}"));
            }
        }
        let non_root = match sc["runAsNonRoot"].as_bool() {
            Some(b) => b,
            None => psc["runAsNonRoot"] == true,
        };
        if !non_root {
            v.push(format!("{name}: runAsNonRoot is not true (container or pod)"));
        }
        if sc["runAsUser"] == 0 {
            v.push(format!("{name}: runAsUser is 0"));
        }
        let seccomp = if sc["seccompProfile"].is_null() { seccomp_ok(psc) } else { seccomp_ok(sc) };
        if !seccomp {
            v.push(format!("{name}: seccompProfile is not RuntimeDefault or Localhost (container or pod)"));
        }
        if sc["appArmorProfile"]["type"] == "Unconfined" {
            v.push(format!("{name}: appArmorProfile is Unconfined"));
        }
        if !sc["procMount"].is_null() && sc["procMount"] != "Default" {
            v.push(format!("{name}: procMount {}", sc["procMount"]));
        }
        check_selinux(name, &sc["seLinuxOptions"], &mut v);
        if sc["windowsOptions"]["hostProcess"] == true {
            v.push(format!("{name}: windowsOptions.hostProcess is true"));
        }
        for p in arr(&c["ports"]) {
            if !p["hostPort"].is_null() && p["hostPort"] != 0 {
                v.push(format!("{name}: hostPort {}", p["hostPort"]));
            }
        }
    }
    v
}

fn check_selinux(whose: &str, se: &Value, v: &mut Vec<String>) {
    if let Some(t) = se["type"].as_str() {
        if !["", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"].contains(&t) {
            v.push(format!("{whose}: seLinuxOptions.type {t}"));
        }
    }
    for k in ["user", "role"] {
        if se[k].as_str().is_some_and(|s| !s.is_empty()) {
            v.push(format!("{whose}: seLinuxOptions.{k} is set"));
        }
    }
}

/// The agent's own parse of the args the chart renders (flags tests and others).
fn parse_agent_args(label: &str, args: &[String]) -> Cli {
    let argv = std::iter::once("berth-agent".to_string()).chain(args.iter().cloned());
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{label}: the agent rejects the chart's args {args:?}:\n{e}"))
}

mod buildkitd;
mod daemonset;
mod docs;
mod examples;
mod flags;
mod rbac;
mod render;
