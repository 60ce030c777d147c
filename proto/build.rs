//! Compiles `proto/*.proto` with protox (pure Rust), so the build needs no system
//! `protoc`: `riemann.proto` becomes the wire schema, `vigil.proto` the gRPC
//! service (server and client) that reuses its `Event`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["riemann.proto", "vigil.proto"], ["proto"])?;
    tonic_build::compile_fds(descriptors)?;
    Ok(())
}
