//! NOTES.txt and the CI examples under Pod Security "restricted".

use super::*;

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
