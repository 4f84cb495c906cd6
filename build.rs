//! Generates the Workload API client and server from proto/workload.proto.
//!
//! protox compiles the proto in pure Rust, so building needs no `protoc` on
//! the machine; tonic-prost-build turns the descriptors into Rust.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/workload.proto");
    let descriptors = protox::compile(["proto/workload.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
