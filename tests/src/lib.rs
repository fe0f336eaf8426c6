//! berth-tests: the end-to-end side of berth.
//!
//! - [`proto`]: the generated gRPC code for the shared protos in `<workspace>/proto`
//!   (`berth.fake.v1` and the BuildKit `moby.buildkit.v1.Control` subset).
//! - [`grpc`]: channels over unix sockets and small client helpers.
//! - [`pattern`]: the deterministic byte stream `Fake.Stream` sends, and its checksum.
//! - [`fakekitd`]: the stand-in build daemon (the `fakekitd` binary is a thin main).
//! - [`apiserver`]: an in-process Kubernetes API double (Nodes, Events) that
//!   records every request; capacity publishing and pod Events are tested on it.
//! - [`kubelet`]: kubelet's side: its plugin watcher and CSI requests, played by the CSI suites.
//! - [`fuzz`]: the bodies of the fuzz targets in `<workspace>/fuzz`, replayed over
//!   the committed corpus by `tests/fuzz_corpus.rs`.
//! - [`podnet`]: a thread in a network namespace of its own, as a pod's client is.
//! - [`registry`]: a real registry (Debian's `docker-registry`) in a test's own network namespace.
//! - [`harness`]: drives the real `berth-agent`, `berth-shim`, `fakekitd` and
//!   `fakeclient` binaries for the end-to-end suites in `tests/`.
//! - [`bench`]: the benchmark suite (the `berth-bench` binary is a thin main);
//!   it drives its agents through the harness's command line and log buffer.

pub mod apiserver;
pub mod bench;
pub mod disk_leaks;
pub mod fakekitd;
pub mod fuzz;
pub mod grpc;
pub mod harness;
pub mod kubelet;
pub mod netfix;
pub mod pattern;
pub mod podnet;
pub mod registry;

/// Generated code. `berth.fake.v1` is compiled here; BuildKit's Control
/// subset (and its `pb.Platform`) is the agent's, compiled once in
/// `berth_agent::proto`, so client and server share one definition.
pub mod proto {
    pub mod berth {
        pub mod fake {
            pub mod v1 {
                tonic::include_proto!("berth.fake.v1");
            }
        }
    }
    pub use berth_agent::proto::{moby, pb};

    /// `berth.fake.v1`: `fake::fake_client::FakeClient`, `fake::fake_server::{Fake, FakeServer}`.
    pub use berth::fake::v1 as fake;
    /// `moby.buildkit.v1`: `control::control_client::ControlClient`,
    /// `control::control_server::{Control, ControlServer}`, `control::types::WorkerRecord`.
    pub use moby::buildkit::v1 as control;
}

pub use grpc::{channel, control_client, fake_client, health_check, try_channel};
pub use harness::{bin_path, Agent, AgentBuilder};
