//! The code generated from `proto/`. Only the edges use it: `api/` for the
//! client API and `raft/{network,service}.rs` for the peer protocol.

#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod taskraft_v1 {
    tonic::include_proto!("taskraft.v1");
}

#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod peer_v1 {
    tonic::include_proto!("taskraft.peer.v1");
}

/// The encoded descriptors of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/taskraft_descriptor.bin"));
