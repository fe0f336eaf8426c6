//! `buildkitd.config` and `buildkitd.certs` (issue 16): the fragment reaches
//! the agent through a ConfigMap mounted as a dir (so updates reach it), the
//! Secret is mounted where the fragment names its files, and what the chart
//! renders is a fragment the agent accepts.

use super::*;

const CONFIG_DIR: &str = "/etc/berth/buildkitd";
const CERTS_DIR: &str = "/etc/berth/buildkitd-certs";

fn mount<'a>(r: &'a Render, name: &str) -> Option<&'a Value> {
    arr(&r.container("berth-agent")["volumeMounts"]).into_iter().find(|m| m["name"] == name)
}

#[test]
fn no_fragment_by_default() {
    let r = default_render();
    assert!(r.flag("buildkitd-config").is_none());
    assert!(r.of_kind("ConfigMap").is_empty());
    assert!(mount(r, "buildkitd-config").is_none() && mount(r, "buildkitd-certs").is_none());
}

#[test]
fn the_fragment_and_its_certs_reach_the_agent() {
    let r = custom_render();
    let cm = r.one("ConfigMap");
    let text = cm["data"]["buildkitd.toml"].as_str().expect("buildkitd.toml in the ConfigMap");
    // The value as given in tests/chart/values-custom.yaml.
    assert!(
        text.starts_with("[registry.\"docker.io\"]\n  mirrors = [\"mirror.registry.svc.cluster.local:5000\"]\n"),
        "{text}"
    );
    // The flag names the file in the mounted dir, and the dir is the ConfigMap's.
    assert_eq!(r.flag("buildkitd-config").as_deref(), Some(&*format!("{CONFIG_DIR}/buildkitd.toml")));
    let m = mount(r, "buildkitd-config").expect("mounted");
    assert_eq!((m["mountPath"].as_str(), m["readOnly"].as_bool()), (Some(CONFIG_DIR), Some(true)));
    assert!(m.get("subPath").is_none(), "a subPath mount never sees ConfigMap updates");
    assert_eq!(volume(r.pod_spec(), "buildkitd-config")["configMap"]["name"], cm["metadata"]["name"]);
    let c = mount(r, "buildkitd-certs").expect("certs mounted");
    assert_eq!((c["mountPath"].as_str(), c["readOnly"].as_bool()), (Some(CERTS_DIR), Some(true)));
    assert_eq!(volume(r.pod_spec(), "buildkitd-certs")["secret"]["secretName"], "registry-certs");
    // The agent accepts what the chart renders, as `run` and `check` would.
    let f = berth_agent::bkconfig::parse(Path::new("/etc/berth/buildkitd/buildkitd.toml"), text, 40 << 30)
        .unwrap_or_else(|e| panic!("the rendered fragment is refused: {e}"));
    assert_eq!(f.table["registry"]["mirror.registry.svc.cluster.local:5000"]["http"].as_bool(), Some(true));
}

#[test]
fn the_schema_refuses_a_bad_secret_name_or_a_non_string_config() {
    let err = render_error(json!({"buildkitd": {"certs": "Not_A_Name"}}));
    assert!(err.contains("certs"), "{err}");
    let err = render_error(json!({"buildkitd": {"config": {"registry": {}}}}));
    assert!(err.contains("config"), "{err}");
    let err = render_error(json!({"buildkitd": {"conifg": ""}}));
    assert!(err.contains("conifg"), "{err}");
}
