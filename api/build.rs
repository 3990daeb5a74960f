//! Generates the gRPC code from `proto/` with protox (pure Rust: no `protoc` to install).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/postern/auth/v1/auth.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    // The descriptors for gRPC server reflection (grpcurl, grpcui, Postman need no .proto file).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("auth_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
