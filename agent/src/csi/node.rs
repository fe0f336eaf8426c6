//! CSI Node: publish and unpublish a pod's socket dir. Both are idempotent
//! and serialized per volume; a refused request touches nothing.

use super::target::{self, Pod};
use super::{Csi, Publication, SOCKET};
use crate::proto::csi_v1::{
    node_server, volume_capability, NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodePublishVolumeRequest, NodePublishVolumeResponse, NodeServiceCapability,
    NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse, Topology,
};
use crate::sys;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

pub struct Node(pub Arc<Csi>);

#[tonic::async_trait]
impl node_server::Node for Node {
    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let csi = &self.0;
        let vol = target::volume_id(&req.volume_id)?.to_string();
        let target = target::target_path(&csi.ctx.run.kubelet_dir, &req.target_path)?;
        match req.volume_capability.as_ref().and_then(|c| c.access_type.as_ref()) {
            Some(volume_capability::AccessType::Mount(_)) => {}
            Some(volume_capability::AccessType::Block(_)) => {
                return Err(Status::invalid_argument("berth volumes are directories: block access is not supported"))
            }
            None => return Err(Status::invalid_argument("volume_capability with a mount access type is required")),
        }
        let pod = Pod::from_context(&req.volume_context)?;
        let allowed = &csi.ctx.run.csi_allowed_namespaces;
        if !allowed.is_empty() && !allowed.iter().any(|n| n == &pod.namespace) {
            return Err(Status::permission_denied(format!(
                "namespace {:?} may not use berth on this node (allowed: {})",
                pod.namespace,
                allowed.join(",")
            )));
        }
        let sock = csi.dir_of(&vol).join(SOCKET);
        if sock.as_os_str().len() > 107 {
            return Err(Status::invalid_argument(format!(
                "socket path {} would exceed 107 bytes: use a shorter --run-dir",
                sock.display()
            )));
        }
        let lock = csi.lock_of(&vol);
        let _held = lock.lock().await;

        if let Some(existing) = csi.published(&vol) {
            if existing.target_path == target && csi.mounted_here(&target, &vol) {
                return Ok(Response::new(NodePublishVolumeResponse {}));
            }
            return Err(Status::failed_precondition(format!(
                "volume {vol} is already published at {}",
                existing.target_path.display()
            )));
        }
        let max = csi.ctx.run.csi_max_per_namespace;
        if max > 0 && csi.count_in_namespace(&pod.namespace) >= max {
            return Err(Status::resource_exhausted(format!(
                "namespace {:?} already holds {max} berth volumes on node {}, the limit (--csi-max-per-namespace)",
                pod.namespace, csi.ctx.node_name
            )));
        }
        if sys::mounts(&csi.ctx.run.host.proc_root).iter().any(|m| m.mount_point == target) {
            return Err(Status::failed_precondition(format!(
                "target path {} is already a mount of something else",
                target.display()
            )));
        }
        let p = Publication { volume_id: vol.clone(), target_path: target.clone(), pod };
        publish(csi, &p).map_err(|e| {
            warn!(volume = %vol, error = %e, "publish failed; undone");
            Status::internal(format!("publish of volume {vol}: {e}"))
        })?;
        info!(volume = %vol, pod = %p.client().display, target = %target.display(), "volume published");
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let csi = &self.0;
        let vol = target::volume_id(&req.volume_id)?.to_string();
        let target = target::target_path(&csi.ctx.run.kubelet_dir, &req.target_path)?;
        let lock = csi.lock_of(&vol);
        let _held = lock.lock().await;

        let live = csi.live.lock().expect("live").remove(&vol);
        let dir = csi.dir_of(&vol);
        // Only our own bind mount is taken down, never a stranger's mount.
        if csi.mounted_here(&target, &vol) {
            sys::unmount(&target).map_err(|e| Status::internal(e.to_string()))?;
        }
        // CSI: the plugin removes the target it created; kubelet may too.
        let _ = std::fs::remove_dir(&target);
        let record = live.as_ref().map(|l| l.publication.clone()).or_else(|| csi.load_record(&vol));
        if let Some(l) = &live {
            l.listener.cancel();
        }
        if let Some(p) = &record {
            csi.end_instance(p).await;
        }
        for res in [std::fs::remove_dir_all(&dir), std::fs::remove_file(csi.record_of(&vol))] {
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Status::internal(format!("cleanup of volume {vol} under {}: {e}", dir.display())))
                }
            }
        }
        info!(volume = %vol, target = %target.display(), known = record.is_some(), "volume unpublished");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        // No STAGE_UNSTAGE: kubelet calls publish directly, as ephemeral
        // volumes require; no stats, expansion or conditions either.
        let caps: Vec<NodeServiceCapability> = Vec::new();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities: caps }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        let segments =
            [("kubernetes.io/arch".to_string(), berth_shim::host::this_arch().to_string())].into_iter().collect();
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.0.ctx.node_name.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(Topology { segments }),
        }))
    }
}

/// Creates the socket dir, the record and the listener, then bind-mounts the
/// dir on the target. Undoes everything on failure.
fn publish(csi: &Arc<Csi>, p: &Publication) -> Result<(), String> {
    let dir = csi.dir_of(&p.volume_id);
    let record = csi.record_of(&p.volume_id);
    let undo = |e: String| {
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&record);
        e
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    sys::chmod(&dir, 0o755).map_err(|e| undo(e.to_string()))?;
    if let Some(parent) = record.parent() {
        std::fs::create_dir_all(parent).map_err(|e| undo(format!("mkdir {}: {e}", parent.display())))?;
    }
    let bytes = serde_json::to_vec_pretty(p).expect("publication serializes");
    std::fs::write(&record, bytes).map_err(|e| undo(format!("write {}: {e}", record.display())))?;
    let token = csi.listen(p).map_err(undo)?;
    let mounted = std::fs::create_dir_all(&p.target_path)
        .map_err(|e| format!("mkdir {}: {e}", p.target_path.display()))
        .and_then(|_| sys::bind_mount(&dir, &p.target_path).map_err(|e| e.to_string()));
    if let Err(e) = mounted {
        token.cancel();
        return Err(undo(e));
    }
    csi.insert(p.clone(), token);
    Ok(())
}
