//! Generated gRPC code. Module paths follow the proto packages so prost's
//! cross-package references (`super::super::...`) resolve.
#![allow(clippy::all, missing_docs)]

pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}
pub mod moby {
    pub mod buildkit {
        pub mod v1 {
            tonic::include_proto!("moby.buildkit.v1");
            pub mod types {
                tonic::include_proto!("moby.buildkit.v1.types");
            }
        }
    }
}
pub mod pb {
    tonic::include_proto!("pb");
}

/// Kubelet's plugin registration API (package without a version).
pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}

pub use csi::v1 as csi_v1;
pub use moby::buildkit::v1 as control;
