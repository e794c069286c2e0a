//! Generates the client of the etcd API subset the load generator drives,
//! with protox, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/etcd/rpc.proto";
    println!("cargo:rerun-if-changed={proto}");
    let file_descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(file_descriptors)?;
    Ok(())
}
