//! Validation of what kubelet (or anyone on the CSI socket) sends: only
//! ephemeral volumes with pod info, a mount access type, a volume id fit for
//! a directory name, and a target path under kubelet's pods dir with no
//! `..` and no symlink below the kubelet dir. Nothing is touched before a
//! request passes.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use tonic::Status;

pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
pub const POD_SA: &str = "csi.storage.k8s.io/serviceAccount.name";

/// The pod a volume belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub service_account: String,
}

impl Pod {
    pub fn from_context(ctx: &HashMap<String, String>) -> Result<Pod, Status> {
        if ctx.get(EPHEMERAL).map(String::as_str) != Some("true") {
            return Err(Status::invalid_argument(format!(
                "berth only serves CSI ephemeral inline volumes ({EPHEMERAL}=true): use `csi: {{driver: berth.dev}}` in the pod spec, not a PersistentVolume"
            )));
        }
        let get = |k: &str| ctx.get(k).filter(|v| !v.is_empty()).cloned();
        let missing: Vec<&str> =
            [POD_NAME, POD_NAMESPACE, POD_UID, POD_SA].into_iter().filter(|k| get(k).is_none()).collect();
        if !missing.is_empty() {
            return Err(Status::invalid_argument(format!(
                "missing pod info {missing:?} in the volume context: the CSIDriver object needs podInfoOnMount: true"
            )));
        }
        let pod = Pod {
            name: get(POD_NAME).unwrap_or_default(),
            namespace: get(POD_NAMESPACE).unwrap_or_default(),
            uid: get(POD_UID).unwrap_or_default(),
            service_account: get(POD_SA).unwrap_or_default(),
        };
        Ok(pod)
    }
}

/// A volume id becomes a directory name: keep it to a safe alphabet.
pub fn volume_id(id: &str) -> Result<&str, Status> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(id)
    } else {
        Err(Status::invalid_argument(format!("volume id {id:?} must be 1-128 characters of [A-Za-z0-9._-]")))
    }
}

/// Checks a target path: absolute, no `.`/`..` components, below
/// `<kubelet_dir>/pods/`, and no symlink in any existing component below
/// the kubelet dir (the kubelet dir itself may be a symlink on some hosts).
pub fn target_path(kubelet_dir: &Path, raw: &str) -> Result<PathBuf, Status> {
    if raw.is_empty() {
        return Err(Status::invalid_argument("target_path is required"));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!("target path {raw:?} is not absolute")));
    }
    let raw_parts: Vec<&str> = raw.split('/').collect();
    if raw_parts.iter().any(|p| *p == ".." || *p == ".") || path.components().any(|c| c == Component::ParentDir) {
        return Err(Status::invalid_argument(format!("target path {raw:?} contains . or .. components")));
    }
    let pods = kubelet_dir.join("pods");
    let rel = path.strip_prefix(&pods).map_err(|_| {
        Status::invalid_argument(format!("target path {raw:?} is outside kubelet's pods dir {}", pods.display()))
    })?;
    if rel.as_os_str().is_empty() {
        return Err(Status::invalid_argument(format!("target path {raw:?} is kubelet's pods dir itself")));
    }
    let mut cur = kubelet_dir.to_path_buf();
    for part in Path::new("pods").join(rel).components() {
        cur.push(part);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Status::invalid_argument(format!(
                    "target path {raw:?} goes through a symlink at {}",
                    cur.display()
                )))
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn pod_info_is_required_and_only_ephemeral_volumes_pass() {
        let full = [(EPHEMERAL, "true"), (POD_NAME, "p"), (POD_NAMESPACE, "ns"), (POD_UID, "u"), (POD_SA, "sa")];
        assert_eq!(Pod::from_context(&ctx(&full)).unwrap().namespace, "ns");
        let e = Pod::from_context(&ctx(&full[1..])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("ephemeral"));
        let e = Pod::from_context(&ctx(&full[..3])).unwrap_err();
        assert!(e.message().contains("podInfoOnMount") && e.message().contains("pod.uid"), "{}", e.message());
    }

    #[test]
    fn volume_ids_are_directory_safe() {
        assert!(volume_id("csi-0123abcd").is_ok());
        for bad in ["", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(volume_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn target_paths_stay_under_kubelet_pods_without_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let k = t.path().join("kubelet");
        let good = k.join("pods/uid1/volumes/kubernetes.io~csi/vol/mount");
        std::fs::create_dir_all(good.parent().unwrap()).unwrap();
        assert_eq!(target_path(&k, good.to_str().unwrap()).unwrap(), good);
        let outside = t.path().join("etc/mount");
        assert!(target_path(&k, outside.to_str().unwrap()).unwrap_err().message().contains("outside"));
        let dotdot = format!("{}/pods/uid1/../../../etc", k.display());
        assert!(target_path(&k, &dotdot).unwrap_err().message().contains(".."));
        assert!(target_path(&k, "relative/path").is_err());
        assert!(target_path(&k, "").is_err());
        // A symlink planted below the pods dir is refused.
        std::os::unix::fs::symlink("/etc", k.join("pods/uid2")).unwrap();
        let via = format!("{}/pods/uid2/volumes/x/mount", k.display());
        assert!(target_path(&k, &via).unwrap_err().message().contains("symlink"));
    }
}
