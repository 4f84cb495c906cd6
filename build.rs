//! Generates the Workload API client and server from proto/workload.proto,
//! and SPIRE's Delegated Identity API (client and server, for the agent's
//! admin socket) from the files vendored under proto/spire.
//!
//! protox compiles the protos in pure Rust, so building needs no `protoc`
//! on the machine; tonic-prost-build turns the descriptors into Rust.

const DELEGATED: &str = "proto/spire/api/agent/delegatedidentity/v1/delegatedidentity.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["proto/workload.proto", DELEGATED], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
