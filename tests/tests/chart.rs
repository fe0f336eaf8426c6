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

// ---------------------------------------------------------------------------
// Render, lint, OpenAPI

#[test]
fn chart_lints_clean_with_helm() {
    for extra in [vec![], vec!["--values".to_string(), custom_values()]] {
        let mut args = vec!["lint"];
        args.extend(extra.iter().map(String::as_str));
        let v = helm_check(&args);
        let report = &v["report"];
        assert_eq!(report["total_charts_linted"], 1, "{report}");
        assert!(arr(&report["errors"]).is_empty(), "helm lint {extra:?}: errors {}", report["errors"]);
        // Severity 1 is informational ("icon is recommended"); 2 warning, 3 error.
        let serious: Vec<_> =
            arr(&report["messages"]).into_iter().filter(|m| m["severity"].as_i64() != Some(1)).collect();
        assert!(serious.is_empty(), "helm lint {extra:?} (Helm {}): {serious:?}", v["helm"]);
    }
}

#[test]
fn every_rendered_object_is_valid_kubernetes() {
    for (label, r) in both() {
        for (template, obj, by_version) in &r.validation {
            assert!(!by_version.is_empty(), "{label}: {obj} was not validated");
            for (version, result) in by_version {
                let crd = r.objects.iter().any(|o| id(o) == *obj && o["apiVersion"] == "monitoring.coreos.com/v1");
                if crd {
                    // Prometheus Operator CRDs are not in the Kubernetes schema; checked by hand below.
                    assert_eq!(result, "no-schema", "{label}: {obj} ({template})");
                } else {
                    assert_eq!(result, "ok", "{label}: {obj} ({template}) against Kubernetes {version}");
                }
            }
        }
    }
    let kinds = |r: &Render| r.objects.iter().map(|o| o["kind"].as_str().unwrap().to_string()).collect::<BTreeSet<_>>();
    let base = ["ClusterRole", "ClusterRoleBinding", "CSIDriver", "DaemonSet", "ServiceAccount"];
    assert_eq!(kinds(default_render()), base.iter().map(|s| s.to_string()).collect());
    let mut custom: BTreeSet<String> = base.iter().map(|s| s.to_string()).collect();
    custom.extend(["PodMonitor", "Service", "ServiceMonitor"].map(String::from));
    assert_eq!(kinds(custom_render()), custom);
}

#[test]
fn monitors_select_the_agent_pods_on_the_metrics_port() {
    let r = custom_render();
    let pod_labels = r.daemonset()["spec"]["template"]["metadata"]["labels"].as_object().unwrap();
    let selects = |sel: &Value| {
        let m = sel["matchLabels"].as_object().expect("matchLabels");
        !m.is_empty() && m.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    let port = &arr(&r.container("berth-agent")["ports"])[0];
    assert_eq!(port["name"], "http");
    assert_eq!(port["containerPort"], 9500);

    let pm = r.one("PodMonitor");
    assert!(selects(&pm["spec"]["selector"]), "{pm}");
    let ep = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        (ep["port"].as_str(), ep["path"].as_str(), ep["interval"].as_str()),
        (Some("http"), Some("/metrics"), Some("20s"))
    );
    assert_eq!(pm["metadata"]["labels"]["release"], "prometheus");

    let sm = r.one("ServiceMonitor");
    let svc = r.one("Service");
    assert!(selects(&json!({"matchLabels": svc["spec"]["selector"]})), "{svc}");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    let svc_labels = svc["metadata"]["labels"].as_object().unwrap();
    let sm_sel = sm["spec"]["selector"]["matchLabels"].as_object().unwrap();
    assert!(sm_sel.iter().all(|(k, v)| svc_labels.get(k) == Some(v)), "ServiceMonitor must select the Service");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(sm["spec"]["endpoints"][0]["interval"], "15s");
}

// ---------------------------------------------------------------------------
// The DaemonSet

#[test]
fn daemonset_runs_on_amd64_and_arm64_with_surge_rollout() {
    for (label, r) in both() {
        let spec = r.pod_spec();
        let terms =
            arr(&spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"]);
        assert_eq!(terms.len(), 1, "{label}: one term (terms are ORed)");
        let exprs = arr(&terms[0]["matchExpressions"]);
        let arch = exprs.iter().find(|e| e["key"] == "kubernetes.io/arch").expect("an arch expression");
        assert_eq!(arch["operator"], "In", "{label}");
        let arches: BTreeSet<String> = strings(&arch["values"]).into_iter().collect();
        assert_eq!(arches, ["amd64", "arm64"].map(String::from).into(), "{label}");

        let ds = r.daemonset();
        let ru = &ds["spec"]["updateStrategy"];
        assert_eq!(ru["type"], "RollingUpdate", "{label}");
        assert_eq!(ru["rollingUpdate"]["maxSurge"], 1, "{label}");
        assert_eq!(ru["rollingUpdate"]["maxUnavailable"], 0, "{label}");

        // Only the agent is privileged; the registrar gets nothing.
        let agent = r.container("berth-agent");
        assert_eq!(agent["securityContext"]["privileged"], true, "{label}");
        let reg = r.container("node-driver-registrar");
        assert_ne!(reg["securityContext"]["privileged"], true, "{label}");
        assert_eq!(reg["securityContext"]["allowPrivilegeEscalation"], false, "{label}");
        assert!(spec["hostNetwork"].is_null() && spec["hostPID"].is_null(), "{label}: no host namespaces");

        let env = arr(&agent["env"]);
        let node = env.iter().find(|e| e["name"] == "NODE_NAME").expect("NODE_NAME");
        assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName", "{label}");
    }
    let d = default_render();
    assert_eq!(d.pod_spec()["priorityClassName"], "system-node-critical");
    assert!(d.pod_spec()["tolerations"].is_null() && d.pod_spec()["nodeSelector"].is_null());
    let c = custom_render();
    assert_eq!(c.pod_spec()["priorityClassName"], "berth-critical");
    assert_eq!(c.pod_spec()["nodeSelector"], json!({"node-pool": "ci"}));
    assert_eq!(c.pod_spec()["tolerations"][0]["key"], "dedicated");
    assert_eq!(c.pod_spec()["imagePullSecrets"], json!([{"name": "registry-creds"}]));
    assert_eq!(c.container("berth-agent")["image"], "registry.example.com/platform/berth:0.2.0-rc.1");
    assert_eq!(d.container("berth-agent")["image"], "berth:0.1.0");
}

#[test]
fn registrar_uses_kubelets_plugin_paths() {
    for (label, r, kubelet) in
        [("defaults", default_render(), "/var/lib/kubelet"), ("custom", custom_render(), "/var/lib/k0s/kubelet")]
    {
        let reg = r.container("node-driver-registrar");
        let args = strings(&reg["args"]);
        assert!(args.contains(&"--csi-address=/csi/csi.sock".to_string()), "{label}: {args:?}");
        let reg_path = format!("--kubelet-registration-path={kubelet}/plugins/{DRIVER}/csi.sock");
        assert!(args.contains(&reg_path), "{label}: {args:?} lacks {reg_path}");
        let spec = r.pod_spec();
        assert_eq!(volume(spec, "registration-dir")["hostPath"]["path"], format!("{kubelet}/plugins_registry"));
        assert_eq!(volume(spec, "plugin-dir")["hostPath"]["path"], format!("{kubelet}/plugins/{DRIVER}"));
        let mounts = |c: &Value| -> BTreeMap<String, String> {
            arr(&c["volumeMounts"])
                .iter()
                .map(|m| (m["name"].as_str().unwrap().to_string(), m["mountPath"].as_str().unwrap().to_string()))
                .collect()
        };
        assert_eq!(mounts(reg)["plugin-dir"], "/csi");
        assert_eq!(mounts(reg)["registration-dir"], "/registration");
        // The agent serves CSI on the socket the registrar dials.
        assert_eq!(mounts(r.container("berth-agent"))["plugin-dir"], "/csi");
        assert_eq!(r.flag("csi-endpoint").as_deref(), Some("unix:///csi/csi.sock"), "{label}");
        assert_eq!(r.flag("kubelet-dir").as_deref(), Some(kubelet), "{label}");
        // The registrar's liveness re-registers when the socket is lost.
        assert_eq!(reg["livenessProbe"]["httpGet"]["path"], "/healthz");
    }
}

#[test]
fn host_paths_are_kubelet_pods_plugin_registration_run_and_state_dirs() {
    for (label, r, kubelet, run, state) in [
        ("defaults", default_render(), "/var/lib/kubelet", "/run/berth", "/var/lib/berth"),
        ("custom", custom_render(), "/var/lib/k0s/kubelet", "/run/berth-ci", "/data/berth"),
    ] {
        let spec = r.pod_spec();
        let host_paths: BTreeMap<String, String> = arr(&spec["volumes"])
            .iter()
            .map(|v| {
                let path = v["hostPath"]["path"].as_str().unwrap_or_else(|| panic!("{label}: {v} is not a hostPath"));
                (v["name"].as_str().unwrap().to_string(), path.to_string())
            })
            .collect();
        let want: BTreeMap<String, String> = [
            ("kubelet-pods", format!("{kubelet}/pods")),
            ("plugin-dir", format!("{kubelet}/plugins/{DRIVER}")),
            ("registration-dir", format!("{kubelet}/plugins_registry")),
            ("run-dir", run.to_string()),
            ("state-dir", state.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(host_paths, want, "{label}");
        // The agent sees run and state dirs where its flags say.
        assert_eq!(r.flag("run-dir").as_deref(), Some(run), "{label}");
        assert_eq!(r.flag("state-dir").as_deref(), Some(state), "{label}");
        assert_eq!(r.flag("listen"), Some(format!("unix://{run}/buildkitd.sock")), "{label}");
        let agent_mounts: BTreeMap<String, String> = arr(&r.container("berth-agent")["volumeMounts"])
            .iter()
            .map(|m| (m["name"].as_str().unwrap().to_string(), m["mountPath"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(agent_mounts["run-dir"], run, "{label}");
        assert_eq!(agent_mounts["state-dir"], state, "{label}");
    }
}

#[test]
fn bidirectional_propagation_only_on_the_agents_kubelet_pods_mount() {
    for (label, r) in both() {
        let spec = r.pod_spec();
        let mut bidirectional = Vec::new();
        for c in containers(spec) {
            for m in arr(&c["volumeMounts"]) {
                if let Some(p) = m["mountPropagation"].as_str() {
                    assert!(p == "Bidirectional" || p == "None" || p == "HostToContainer", "{label}: {m}");
                    if p == "Bidirectional" {
                        bidirectional.push((c["name"].as_str().unwrap().to_string(), m.clone()));
                    }
                }
            }
        }
        assert_eq!(bidirectional.len(), 1, "{label}: Bidirectional mounts: {bidirectional:?}");
        let (container, m) = &bidirectional[0];
        assert_eq!(container, "berth-agent", "{label}");
        assert_eq!(m["name"], "kubelet-pods", "{label}");
        // Mounted at the host path itself, so CSI target paths mean the same inside.
        let host = volume(spec, "kubelet-pods")["hostPath"]["path"].as_str().unwrap();
        assert_eq!(m["mountPath"].as_str(), Some(host), "{label}");
        assert_eq!(Some(format!("{}/pods", r.flag("kubelet-dir").unwrap())).as_deref(), Some(host), "{label}");
        // Bidirectional needs a privileged container.
        assert_eq!(r.container(container)["securityContext"]["privileged"], true);
    }
}

#[test]
fn probes_use_healthz_and_readyz_on_the_http_addr() {
    for (label, r, port) in [("defaults", default_render(), 9411), ("custom", custom_render(), 9500)] {
        let agent = r.container("berth-agent");
        assert_eq!(r.flag("http-addr"), Some(format!("0.0.0.0:{port}")), "{label}");
        let named: BTreeMap<String, i64> = arr(&agent["ports"])
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_string(), p["containerPort"].as_i64().unwrap()))
            .collect();
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &agent[probe]["httpGet"];
            assert_eq!(get["path"], path, "{label}: {probe}");
            let p = match &get["port"] {
                Value::String(name) => named[name],
                n => n.as_i64().unwrap(),
            };
            assert_eq!(p, port, "{label}: {probe} port");
        }
    }
}

#[test]
fn grace_period_covers_the_drain_timeout() {
    let check = |label: &str, r: &Render, margin: u64| {
        let ds = r.pod_spec();
        let grace = ds["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
        let drain = r.flag("drain-timeout").expect("--drain-timeout rendered");
        // The agent's own parser decides what the flag means.
        let parsed = parse_agent_args(label, &r.agent_args());
        let AgentCommand::Run(run) = parsed.command else { panic!("{label}: not `run`") };
        assert_eq!(run.drain_timeout, Duration::from_secs(seconds(&drain)), "{label}: {drain}");
        assert!(grace >= run.drain_timeout.as_secs(), "{label}: grace {grace}s < drain {drain}");
        assert_eq!(grace, run.drain_timeout.as_secs() + margin, "{label}: grace = drain + margin");
    };
    check("defaults", default_render(), 30);
    check("values-custom.yaml", custom_render(), 60);
    assert_eq!(default_render().pod_spec()["terminationGracePeriodSeconds"], 3600 + 30);
    assert_eq!(custom_render().pod_spec()["terminationGracePeriodSeconds"], 5400 + 60);
    for drain in ["45s", "90m", "2h", "1h1m1s", "10m30s", "0s"] {
        let r = render(&["--set-json", &json!({"timeouts": {"drain": drain}}).to_string()]);
        check(drain, &r, 30);
    }
    // Units the grace period cannot be derived from are rejected up front.
    for drain in ["1d", "30", "1.5h", "", "30m1h"] {
        let err = render_error(json!({"timeouts": {"drain": drain}}));
        assert!(err.contains("/timeouts/drain"), "drain {drain:?}: {err}");
    }
}

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

fn parse_agent_args(label: &str, args: &[String]) -> Cli {
    let argv = std::iter::once("berth-agent".to_string()).chain(args.iter().cloned());
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{label}: the agent rejects the chart's args {args:?}:\n{e}"))
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

// ---------------------------------------------------------------------------
// RBAC, CSIDriver, ServiceAccount

#[test]
fn rbac_grants_only_get_and_patch_of_nodes() {
    for (label, r) in both() {
        assert!(r.of_kind("Role").is_empty() && r.of_kind("RoleBinding").is_empty(), "{label}: no namespaced RBAC");
        let role = r.one("ClusterRole");
        let mut granted = BTreeSet::new();
        for rule in arr(&role["rules"]) {
            assert_eq!(strings(&rule["apiGroups"]), [""], "{label}: core group only: {rule}");
            assert!(rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null(), "{label}: {rule}");
            for res in strings(&rule["resources"]) {
                assert!(res == "nodes" || res == "nodes/status", "{label}: resource {res}");
                for verb in strings(&rule["verbs"]) {
                    assert!(verb == "get" || verb == "patch", "{label}: verb {verb} on {res} (no list/watch/*)");
                    granted.insert((res.clone(), verb));
                }
            }
        }
        // What the agent needs: read and patch its Node and the Node's status.
        let need: BTreeSet<(String, String)> =
            [("nodes", "get"), ("nodes", "patch"), ("nodes/status", "get"), ("nodes/status", "patch")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .into();
        assert_eq!(granted, need, "{label}");

        let binding = r.one("ClusterRoleBinding");
        assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        let sa = r.one("ServiceAccount");
        let subject = &binding["subjects"][0];
        assert_eq!(arr(&binding["subjects"]).len(), 1, "{label}");
        assert_eq!(subject["kind"], "ServiceAccount");
        assert_eq!(subject["name"], sa["metadata"]["name"]);
        assert_eq!(subject["namespace"], sa["metadata"]["namespace"]);
        assert_eq!(r.pod_spec()["serviceAccountName"], sa["metadata"]["name"], "{label}");
    }
    assert_eq!(custom_render().one("ServiceAccount")["metadata"]["name"], "berth-agent");
}

#[test]
fn csidriver_is_ephemeral_attachless_with_pod_info() {
    for (label, r) in both() {
        let d = r.one("CSIDriver");
        assert_eq!(d["metadata"]["name"], DRIVER, "{label}");
        assert_eq!(r.flag("csi-driver-name").as_deref(), Some(DRIVER), "{label}");
        let s = &d["spec"];
        assert_eq!(s["attachRequired"], false, "{label}");
        assert_eq!(s["podInfoOnMount"], true, "{label}");
        assert_eq!(s["volumeLifecycleModes"], json!(["Ephemeral"]), "{label}");
        assert_eq!(s["fsGroupPolicy"], "None", "{label}: kubelet must not chown the socket dir");
    }
}

// ---------------------------------------------------------------------------
// values.schema.json

#[test]
fn schema_rejects_wrong_types_and_unknown_keys() {
    let cases = [
        (json!({"build": {"memory": 4}}), "/build/memory"),
        (json!({"build": {"pids": "many"}}), "/build/pids"),
        (json!({"build": {"cpus": "two"}}), "/build/cpus"),
        (json!({"slots": {"maxBuilds": "lots"}}), "/slots/maxBuilds"),
        (json!({"slots": {"maxBuilds": 0}}), "/slots/maxBuilds"),
        (json!({"timeouts": {"idle": 30}}), "/timeouts/idle"),
        (json!({"scope": "pod"}), "/scope"),
        (json!({"namespaces": {"allowed": "ci"}}), "/namespaces/allowed"),
        (json!({"metrics": {"port": "9411"}}), "/metrics/port"),
        (json!({"metrics": {"podMonitor": {"enabled": "yes"}}}), "/metrics/podMonitor/enabled"),
        (json!({"capacity": {"publish": "true"}}), "/capacity/publish"),
        (json!({"architectures": ["amd64", "s390x"]}), "/architectures"),
        (json!({"paths": {"runDir": "/var/run/berth/sockets"}}), "/paths/runDir"),
        (json!({"idmap": {"count": 1000}}), "/idmap/count"),
        (json!({"image": {"pullPolicy": "Sometimes"}}), "/image/pullPolicy"),
        // Unknown keys, at the root and nested.
        (json!({"replicas": 3}), "replicas"),
        (json!({"build": {"memroy": "4Gi"}}), "memroy"),
        (json!({"image": {"digest": "sha256:00"}}), "digest"),
        (json!({"metrics": {"serviceMonitor": {"scrapeTimeout": "10s"}}}), "scrapeTimeout"),
        (json!({"tolerations": [{"key": "ci", "opertor": "Exists"}]}), "opertor"),
        (json!({"resources": {"request": {"cpu": "1"}}}), "request"),
    ];
    for (values, needle) in cases {
        let err = render_error(values.clone());
        assert!(err.starts_with("HelmValuesError"), "{values}: {err}");
        assert!(err.contains(needle), "{values}: the error should name {needle}: {err}");
    }
    // Right types of the other shape still render.
    for ok in [
        json!({"slots": {"maxBuilds": 6}}),
        json!({"build": {"cpus": 0.5}}),
        json!({"build": {"cpus": "1500m"}}),
        json!({"architectures": ["arm64"]}),
    ] {
        let r = render(&["--set-json", &ok.to_string()]);
        parse_agent_args(&ok.to_string(), &r.agent_args());
    }
}

// ---------------------------------------------------------------------------
// NOTES.txt and the CI examples

#[test]
fn notes_print_the_ci_pod_snippet() {
    for (label, r, resource) in
        [("defaults", default_render(), RESOURCE), ("custom", custom_render(), "example.com/builds")]
    {
        let n = &r.notes;
        for want in [
            format!("driver: {DRIVER}"),
            format!("{resource}: \"1\""),
            format!("mountPath: {SOCKET_DIR}"),
            "docker buildx create".to_string(),
            BUILDX_REMOTE.to_string(),
            "requests:".to_string(),
            "limits:".to_string(),
        ] {
            assert!(n.contains(&want), "{label}: NOTES.txt lacks {want:?}:\n{n}");
        }
    }
}

/// The examples, parsed: (file, text, pods (validation included), TOML).
struct Example {
    file: String,
    text: String,
    pods: Vec<(Value, BTreeMap<String, String>)>,
    toml: Value,
}

fn examples() -> Vec<Example> {
    let v = helm_check(&["examples"]);
    arr(&v["files"])
        .into_iter()
        .map(|f| Example {
            file: f["file"].as_str().unwrap().to_string(),
            text: f["text"].as_str().unwrap().to_string(),
            pods: arr(&f["documents"])
                .into_iter()
                .filter(|d| !d["object"].is_null())
                .map(|d| (d["object"].clone(), serde_json::from_value(d["validation"].clone()).unwrap()))
                .collect(),
            toml: f["toml"].clone(),
        })
        .collect()
}

/// The CI contract of a pod spec: the berth CSI volume mounted at /run/berth in a
/// container that requests and limits one build slot.
fn assert_ci_contract(what: &str, spec: &Value) {
    let vols: Vec<&Value> = arr(&spec["volumes"]).into_iter().filter(|v| v["csi"]["driver"] == DRIVER).collect();
    assert_eq!(vols.len(), 1, "{what}: one {DRIVER} CSI volume");
    assert!(vols[0]["csi"]["readOnly"] != true, "{what}: the socket dir must be writable (connect)");
    let vol = vols[0]["name"].as_str().unwrap();
    let users: Vec<&Value> = containers(spec)
        .into_iter()
        .filter(|c| arr(&c["volumeMounts"]).iter().any(|m| m["name"] == vol && m["mountPath"] == SOCKET_DIR))
        .collect();
    assert!(!users.is_empty(), "{what}: no container mounts {vol} at {SOCKET_DIR}");
    for c in users {
        let res = &c["resources"];
        assert_eq!(res["requests"][RESOURCE], "1", "{what}: {} requests one {RESOURCE}", c["name"]);
        assert_eq!(res["limits"][RESOURCE], "1", "{what}: {}: extended resources need limits = requests", c["name"]);
    }
}

#[test]
fn ci_examples_pass_pod_security_restricted_and_use_berth() {
    let ex = examples();
    let files: BTreeSet<&str> = ex.iter().map(|e| e.file.as_str()).collect();
    for want in ["ci-pod.yaml", "github-actions-runner.yaml", "gitlab-runner.toml", "gitlab-runner-job-pod.yaml"] {
        assert!(files.contains(want), "chart/examples/{want} is missing ({files:?})");
    }
    let mut pods = 0;
    for e in &ex {
        for (pod, by_version) in &e.pods {
            pods += 1;
            assert_eq!(pod["kind"], "Pod", "{}", e.file);
            for (version, result) in by_version {
                assert_eq!(result, "ok", "{}: invalid for Kubernetes {version}", e.file);
            }
            let spec = &pod["spec"];
            let v = restricted_violations(spec);
            assert!(v.is_empty(), "{}: not Pod Security restricted: {v:?}", e.file);
            assert_ci_contract(&e.file, spec);
        }
        if e.file.ends_with(".yaml") || e.file.ends_with(".toml") {
            assert!(
                e.text.contains("docker buildx create") && e.text.contains(BUILDX_REMOTE),
                "{}: the buildx line",
                e.file
            );
        }
    }
    assert_eq!(pods, 3, "plain pod, ARC runner pod, GitLab job pod");

    // GitLab's config.toml makes such pods: CSI volume, slot request, restricted contexts.
    let toml = &ex.iter().find(|e| e.file == "gitlab-runner.toml").unwrap().toml;
    let runner = &toml["runners"][0];
    assert_eq!(runner["executor"], "kubernetes");
    let k = &runner["kubernetes"];
    let csi = &k["volumes"]["csi"][0];
    assert_eq!((csi["driver"].as_str(), csi["mount_path"].as_str()), (Some(DRIVER), Some(SOCKET_DIR)));
    assert_eq!(k["pod_security_context"]["run_as_non_root"], true);
    assert_eq!(k["pod_security_context"]["seccomp_profile"]["type"], "RuntimeDefault");
    for c in ["build", "helper", "init_permissions"] {
        let sc = &k[format!("{c}_container_security_context")];
        assert_eq!(sc["allow_privilege_escalation"], false, "{c}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{c}");
    }
    assert_ne!(k["privileged"], true);
    assert_eq!(runner["feature_flags"]["FF_USE_ADVANCED_POD_SPEC_CONFIGURATION"], true, "pod_spec needs the flag");
    let patch = k["pod_spec"][0]["patch"].as_str().unwrap();
    assert_eq!(patch.matches(&format!("{RESOURCE}: \"1\"")).count(), 2, "requests and limits: {patch}");
    assert!(patch.contains("name: build"), "{patch}");
}

#[test]
fn restricted_check_catches_what_it_must() {
    // The agent pod is the opposite of restricted: the check must say so.
    let agent = restricted_violations(default_render().pod_spec());
    for needle in ["privileged", "hostPath", "allowPrivilegeEscalation", "runAsNonRoot", "seccompProfile"] {
        assert!(agent.iter().any(|v| v.contains(needle)), "agent pod: no {needle} finding in {agent:?}");
    }
    // And each single weakening of the plain CI pod.
    let ex = examples();
    let base = ex.iter().find(|e| e.file == "ci-pod.yaml").unwrap().pods[0].0["spec"].clone();
    assert!(restricted_violations(&base).is_empty());
    type Mutation = Box<dyn Fn(&mut Value)>;
    let mutations: Vec<(&str, Mutation)> = vec![
        ("hostNetwork", Box::new(|s| s["hostNetwork"] = json!(true))),
        ("hostPID", Box::new(|s| s["hostPID"] = json!(true))),
        ("hostIPC", Box::new(|s| s["hostIPC"] = json!(true))),
        (
            "hostPath",
            Box::new(|s| s["volumes"].as_array_mut().unwrap().push(json!({"name": "h", "hostPath": {"path": "/"}}))),
        ),
        ("privileged", Box::new(|s| s["containers"][0]["securityContext"]["privileged"] = json!(true))),
        (
            "allowPrivilegeEscalation",
            Box::new(|s| s["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = json!(true)),
        ),
        (
            "runAsNonRoot",
            Box::new(|s| s["securityContext"].as_object_mut().unwrap().retain(|k, _| k != "runAsNonRoot")),
        ),
        ("runAsNonRoot", Box::new(|s| s["containers"][0]["securityContext"]["runAsNonRoot"] = json!(false))),
        ("runAsUser", Box::new(|s| s["containers"][0]["securityContext"]["runAsUser"] = json!(0))),
        (
            "seccompProfile",
            Box::new(|s| s["securityContext"].as_object_mut().unwrap().retain(|k, _| k != "seccompProfile")),
        ),
        (
            "seccompProfile",
            Box::new(|s| s["containers"][0]["securityContext"]["seccompProfile"] = json!({"type": "Unconfined"})),
        ),
        (
            "drop lacks ALL",
            Box::new(|s| s["containers"][0]["securityContext"]["capabilities"] = json!({"drop": ["NET_RAW"]})),
        ),
        (
            "adds capability",
            Box::new(|s| s["containers"][0]["securityContext"]["capabilities"]["add"] = json!(["SYS_ADMIN"])),
        ),
        ("hostPort", Box::new(|s| s["containers"][0]["ports"] = json!([{"containerPort": 80, "hostPort": 80}]))),
        ("procMount", Box::new(|s| s["containers"][0]["securityContext"]["procMount"] = json!("Unmasked"))),
        ("sysctl", Box::new(|s| s["securityContext"]["sysctls"] = json!([{"name": "kernel.msgmax", "value": "1"}]))),
        ("seLinuxOptions", Box::new(|s| s["securityContext"]["seLinuxOptions"] = json!({"type": "spc_t"}))),
        (
            "not allowed",
            Box::new(|s| {
                s["volumes"].as_array_mut().unwrap().push(json!({"name": "n", "nfs": {"server": "x", "path": "/"}}))
            }),
        ),
        (
            "privileged",
            Box::new(|s| {
                s["initContainers"] = json!([{"name": "i", "image": "x", "securityContext": {"privileged": true}}])
            }),
        ),
    ];
    for (needle, mutate) in mutations {
        let mut spec = base.clone();
        mutate(&mut spec);
        let v = restricted_violations(&spec);
        assert!(v.iter().any(|f| f.contains(needle)), "mutation {needle}: findings {v:?}");
    }
}

// ---------------------------------------------------------------------------
// Docs and image

#[test]
fn chart_readme_says_why_the_agent_is_privileged() {
    let readme = std::fs::read_to_string(workspace().join("chart/README.md")).expect("chart/README.md");
    for want in ["privileged", "mount", "user namespace", "cgroup", "Bidirectional", "restricted", "list"] {
        assert!(readme.contains(want), "chart/README.md should mention {want:?}");
    }
    // Every key of values.yaml has a comment right above it, but for the entries of
    // free-form maps (resource quantities, labels) that their documented parent covers.
    let values = std::fs::read_to_string(workspace().join("chart/values.yaml")).unwrap();
    let lines: Vec<&str> = values.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') || t.starts_with("- ") {
            continue;
        }
        let commented = i > 0 && lines[i - 1].trim_start().starts_with('#');
        let parent = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#') && indent(l) < indent(line));
        let free_form = parent.is_some_and(|p| ["requests:", "limits:"].contains(&p.trim()));
        assert!(commented || free_form, "chart/values.yaml line {}: {line:?} has no comment above it", i + 1);
    }
}

#[test]
fn dockerfile_takes_buildkit_from_the_pinned_rootless_image() {
    let df = std::fs::read_to_string(workspace().join("Dockerfile")).expect("Dockerfile");
    assert!(df.contains("moby/buildkit:${BUILDKIT_VERSION}-rootless") && df.contains("ARG BUILDKIT_VERSION=v0.32.2"));
    for bin in ["/usr/bin/buildkitd", "/usr/bin/buildctl", "/usr/bin/buildkit-runc"] {
        assert!(df.contains(bin), "Dockerfile should copy {bin}");
    }
    for want in
        ["--mount=type=cache", "TARGETARCH", "BUILDPLATFORM", "berth-agent", "berth-shim", "org.opencontainers.image"]
    {
        assert!(df.contains(want), "Dockerfile should use {want}");
    }
    let ignore = std::fs::read_to_string(workspace().join(".dockerignore")).expect(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim().trim_end_matches('/') == "target" || l.trim() == "/target"),
        ".dockerignore keeps target/ out"
    );
}
