//! The csi-sanity (kubernetes-csi/csi-test v5) behaviours berth relies on,
//! one CI test each, asked the way csi-sanity asks them (CI cannot build
//! csi-sanity; docs/compatibility.md has the local run). Before every spec
//! csi-sanity calls ControllerGetCapabilities, so that one answers an empty
//! list; the Identity and Node specs of a node-only plugin follow.

use berth_agent::proto::csi_v1::controller_client::ControllerClient;
use berth_agent::proto::csi_v1::identity_client::IdentityClient;
use berth_agent::proto::csi_v1::node_client::NodeClient;
use berth_agent::proto::csi_v1::{
    node_service_capability, plugin_capability, volume_capability, ControllerGetCapabilitiesRequest,
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, NodeGetCapabilitiesRequest, NodeGetInfoRequest,
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest, ProbeRequest, VolumeCapability,
};
use berth_tests::harness::Agent;
use berth_tests::try_channel;
use tonic::transport::Channel;
use tonic::Code;

async fn csi_agent(name: &str) -> (Agent, Channel) {
    let agent = Agent::builder(name)
        .args(["--max-builds", "2", "--http-addr", "off"])
        .dir_arg("--csi-endpoint", "csi.sock")
        .dir_arg("--kubelet-dir", "kubelet")
        .dir_arg("--run-dir", "run")
        .start_async()
        .await;
    let sock = agent.dir().join("csi.sock");
    let ok = berth_tests::harness::poll_async(
        std::time::Duration::from_secs(20),
        std::time::Duration::from_millis(50),
        || berth_tests::harness::socket_listening(&sock).then_some(()),
    )
    .await;
    assert!(ok.is_some(), "CSI socket never listened:\n{}", agent.log_tail(30));
    let ch = try_channel(&sock).await.expect("CSI channel");
    (agent, ch)
}

/// csi-sanity's generated volume ids: `fake-vol-id-<10 chars>`.
const VOL: &str = "fake-vol-id-0123456789";

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_get_capabilities_is_an_empty_list() {
    let (_agent, ch) = csi_agent("sanity-ctrl").await;
    let caps = ControllerClient::new(ch).controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await;
    let caps = caps.expect("csi-sanity's BeforeEach needs ControllerGetCapabilities to succeed").into_inner();
    assert!(caps.capabilities.is_empty(), "berth has no controller: {caps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_specs() {
    let (agent, ch) = csi_agent("sanity-identity").await;
    let mut id = IdentityClient::new(ch);
    // GetPluginCapabilities: only known service types; no CONTROLLER_SERVICE.
    let caps = id.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    for c in &caps.capabilities {
        match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => {
                let t = plugin_capability::service::Type::try_from(s.r#type).expect("known service type");
                assert_ne!(t, plugin_capability::service::Type::ControllerService);
                assert_ne!(t, plugin_capability::service::Type::Unknown);
            }
            other => panic!("unknown plugin capability {other:?}"),
        }
    }
    // Probe: OK (ready may be set).
    id.probe(ProbeRequest {}).await.expect("Probe");
    // GetPluginInfo: a DNS-like name of at most 63 characters.
    let info = id.get_plugin_info(GetPluginInfoRequest {}).await.unwrap().into_inner();
    let n = &info.name;
    assert!(!n.is_empty() && n.len() <= 63, "{n:?}");
    assert!(
        n.starts_with(|c: char| c.is_ascii_alphabetic()) && n.ends_with(|c: char| c.is_ascii_alphabetic()),
        "{n:?}"
    );
    assert!(n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')), "{n:?}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_capability_and_info_specs() {
    let (_agent, ch) = csi_agent("sanity-node-info").await;
    let mut node = NodeClient::new(ch.clone());
    let caps = node.node_get_capabilities(NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    for c in &caps.capabilities {
        let Some(node_service_capability::Type::Rpc(rpc)) = &c.r#type else { panic!("not an RPC capability: {c:?}") };
        node_service_capability::rpc::Type::try_from(rpc.r#type).expect("known node capability");
    }
    let info = node.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert!(!info.node_id.is_empty());
    assert!(info.max_volumes_per_node >= 0);
    // VOLUME_ACCESSIBILITY_CONSTRAINTS is advertised, so topology must be set.
    assert!(info.accessible_topology.is_some(), "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publish_and_unpublish_refuse_missing_fields() {
    let (agent, ch) = csi_agent("sanity-node-args").await;
    let mut node = NodeClient::new(ch);
    let target = agent.dir().join("kubelet/pods/sanity/volumes/kubernetes.io~csi/vol/mount");
    std::fs::create_dir_all(&target).unwrap();
    let target = target.display().to_string();
    let cases = [
        ("no volume id", NodePublishVolumeRequest { volume_capability: Some(mount_cap()), ..Default::default() }),
        (
            "no target path",
            NodePublishVolumeRequest {
                volume_id: VOL.into(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            },
        ),
        (
            "no volume capability",
            NodePublishVolumeRequest {
                volume_id: VOL.into(),
                target_path: format!("{target}/target"),
                ..Default::default()
            },
        ),
    ];
    for (what, req) in cases {
        let err = node.node_publish_volume(req).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "publish with {what}: {err:?}");
    }
    let err = node.node_unpublish_volume(NodeUnpublishVolumeRequest::default()).await.expect_err("no volume id");
    assert_eq!(err.code(), Code::InvalidArgument, "unpublish with no volume id: {err:?}");
    let req = NodeUnpublishVolumeRequest { volume_id: VOL.into(), target_path: String::new() };
    let err = node.node_unpublish_volume(req).await.expect_err("no target path");
    assert_eq!(err.code(), Code::InvalidArgument, "unpublish with no target path: {err:?}");
}
