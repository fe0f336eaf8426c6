//! CSI Identity: who we are and whether we are ready.

use super::Csi;
use crate::proto::csi_v1::{
    identity_server, plugin_capability, GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse,
    GetPluginInfoRequest, GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct Identity(pub Arc<Csi>);

#[tonic::async_trait]
impl identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.0.ctx.run.csi_driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // No controller service: ephemeral volumes need none. Topology is
        // reported so kubelet records the node's arch in CSINode.
        let cap = PluginCapability {
            r#type: Some(plugin_capability::Type::Service(plugin_capability::Service {
                r#type: plugin_capability::service::Type::VolumeAccessibilityConstraints as i32,
            })),
        };
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities: vec![cap] }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = !*self.0.ctx.draining.borrow();
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
