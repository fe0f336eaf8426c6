//! CSI Controller: berth has no controller (ephemeral inline volumes need
//! none, and the plugin does not advertise CONTROLLER_SERVICE), but generic
//! CSI clients such as csi-sanity call ControllerGetCapabilities before
//! every spec to learn which controller specs to run. The answer is an empty
//! list; every other Controller RPC is UNIMPLEMENTED (not declared in the
//! proto, so tonic's router answers it).

use crate::proto::csi_v1::{controller_server, ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse};
use tonic::{Request, Response, Status};

pub struct Controller;

#[tonic::async_trait]
impl controller_server::Controller for Controller {
    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse { capabilities: vec![] }))
    }
}
