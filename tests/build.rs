//! Compiles the shared protos in `<workspace>/proto` without a system protoc:
//! protox parses them into a FileDescriptorSet, tonic-prost-build generates
//! the messages and both client and server stubs. Only fakekitd's own
//! service: the BuildKit protos come from `berth_agent::proto`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("..").join("proto");
    // BuildKit's Control subset is compiled by the agent crate and reused.
    let files = ["berth/fake/v1/fake.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
