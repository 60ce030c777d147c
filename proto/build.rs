//! Compiles `proto/*.proto` with protox (pure Rust), so the build needs no system
//! `protoc`: `riemann.proto` becomes the wire schema, `vigil.proto` the gRPC
//! service (server and client) that reuses its `Event`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["riemann.proto", "vigil.proto"], ["proto"])?;
    // vigil.Msg is written by hand: it keeps its events encoded, for vigil's
    // own decoder (src/grpc/msg.rs); so is QueryRequest, to repair a query
    // that is not UTF-8 (src/grpc/query_request.rs); and QueryResponse, encoded
    // off the async workers (src/grpc/query_response.rs).
    tonic_build::configure()
        .extern_path(".vigil.Msg", "crate::grpc::Msg")
        .extern_path(".vigil.QueryRequest", "crate::grpc::QueryRequest")
        .extern_path(".vigil.QueryResponse", "crate::grpc::QueryResponse")
        .compile_fds(descriptors)?;
    Ok(())
}
