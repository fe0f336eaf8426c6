//! The DaemonSet: arch, rollout, kubelet paths, propagation, probes, grace.

use super::*;

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

        // One container, the agent: it registers with kubelet itself (no
        // node-driver-registrar sidecar, whose exit removed the new pod's socket).
        let agent = r.container("berth-agent");
        assert_eq!(agent["securityContext"]["privileged"], true, "{label}");
        let names: Vec<&str> = containers(spec).iter().filter_map(|c| c["name"].as_str()).collect();
        assert_eq!(names, ["berth-agent"], "{label}: no registrar sidecar");
        assert!(spec["hostNetwork"].is_null() && spec["hostIPC"].is_null(), "{label}: no host network or IPC");

        let env = arr(&agent["env"]);
        let node = env.iter().find(|e| e["name"] == "NODE_NAME").expect("NODE_NAME");
        assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName", "{label}");
    }
    let d = default_render();
    // hostPID by default: the node socket names clients by their cgroup,
    // which needs their pids (issue 17); a CSI-only install may turn it off.
    assert_eq!(d.pod_spec()["hostPID"], true);
    assert!(custom_render().pod_spec()["hostPID"].is_null(), "hostPID: false renders no field");
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
fn agent_registers_itself_in_kubelets_plugin_paths() {
    for (label, r, kubelet) in
        [("defaults", default_render(), "/var/lib/kubelet"), ("custom", custom_render(), "/var/lib/k0s/kubelet")]
    {
        let spec = r.pod_spec();
        let plugin = format!("{kubelet}/plugins/{DRIVER}");
        assert_eq!(volume(spec, "registration-dir")["hostPath"]["path"], format!("{kubelet}/plugins_registry"));
        assert_eq!(volume(spec, "plugin-dir")["hostPath"]["path"], plugin);
        let mounts: BTreeMap<String, String> = arr(&r.container("berth-agent")["volumeMounts"])
            .iter()
            .map(|m| (m["name"].as_str().unwrap().to_string(), m["mountPath"].as_str().unwrap().to_string()))
            .collect();
        // The endpoint the agent names to kubelet is the host path: the plugin
        // dir is mounted where it is on the node.
        assert_eq!(mounts["plugin-dir"], plugin, "{label}");
        assert_eq!(r.flag("csi-endpoint"), Some(format!("unix://{plugin}/csi.sock")), "{label}");
        // kubelet's plugin watcher dir, where the agent offers its registration socket.
        assert_eq!(mounts["registration-dir"], format!("{kubelet}/plugins_registry"), "{label}");
        assert_eq!(r.flag("registration-dir"), Some(format!("{kubelet}/plugins_registry")), "{label}");
        assert_eq!(r.flag("kubelet-dir").as_deref(), Some(kubelet), "{label}");
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
            // bkconfig: the buildkitd.toml ConfigMap and certs Secret (see buildkitd.rs).
            .filter(|v| !["buildkitd-config", "buildkitd-certs"].contains(&v["name"].as_str().unwrap_or_default()))
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
            ("dev", "/dev".to_string()),
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
