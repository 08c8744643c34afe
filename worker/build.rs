//! Generates the gRPC types and services of `proto/ballast.proto` and `proto/members.proto` (needs `protoc`,
//! which the stack's installer provides).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ballast.proto");
    println!("cargo:rerun-if-changed=proto/members.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/ballast.proto", "proto/members.proto"], &["proto"])?;
    Ok(())
}
