//! Compiles the shared protos in `<workspace>/proto` without a system protoc:
//! protox parses them into a FileDescriptorSet, tonic-prost-build generates
//! the messages and both client and server stubs.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("..").join("proto");
    let files = [
        "berth/fake/v1/fake.proto",
        "moby/buildkit/v1/control.proto",
        "moby/buildkit/v1/types/worker.proto",
        "moby/buildkit/solver/pb/ops.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
