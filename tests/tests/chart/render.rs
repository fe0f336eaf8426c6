//! Render, lint, OpenAPI validation and the monitors.

use super::*;

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
    custom.extend(["ConfigMap", "PodMonitor", "Service", "ServiceMonitor"].map(String::from));
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
