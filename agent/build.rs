//! Compiles the protos the agent speaks without a system protoc: protox
//! parses them, tonic-prost-build generates the code. CSI gets a server
//! (kubelet calls us) and a client (tests act as kubelet); BuildKit's
//! Control gets a client (readiness fallback for daemons without health);
//! kubelet's plugin registration gets a server (kubelet calls us) and a
//! client (tests play kubelet's plugin watcher).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("..").join("proto");
    let files = [
        "csi/v1/csi.proto",
        "moby/buildkit/v1/control.proto",
        "moby/buildkit/v1/types/worker.proto",
        "moby/buildkit/solver/pb/ops.proto",
        "pluginregistration/v1/api.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
