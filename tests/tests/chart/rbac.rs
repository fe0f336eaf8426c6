//! RBAC, the CSIDriver, the ServiceAccount and the values schema.

use super::*;

// ---------------------------------------------------------------------------
// RBAC, CSIDriver, ServiceAccount

#[test]
fn rbac_grants_only_get_and_patch_of_nodes_and_create_of_events() {
    for (label, r) in both() {
        assert!(r.of_kind("Role").is_empty() && r.of_kind("RoleBinding").is_empty(), "{label}: no namespaced RBAC");
        let role = r.one("ClusterRole");
        let mut granted = BTreeSet::new();
        for rule in arr(&role["rules"]) {
            let groups = strings(&rule["apiGroups"]);
            assert_eq!(groups.len(), 1, "{label}: one API group per rule: {rule}");
            assert!(rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null(), "{label}: {rule}");
            for res in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    granted.insert((groups[0].clone(), res.clone(), verb));
                }
            }
        }
        // What the agent needs and nothing more: read and patch its Node and
        // the Node's status (capacity publishing), create Events on pods
        // whose instance ended (events.k8s.io, never core Events, never
        // list/watch/update).
        let need: BTreeSet<(String, String, String)> = [
            ("", "nodes", "get"),
            ("", "nodes", "patch"),
            ("", "nodes/status", "get"),
            ("", "nodes/status", "patch"),
            ("events.k8s.io", "events", "create"),
        ]
        .map(|(g, a, b)| (g.to_string(), a.to_string(), b.to_string()))
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
