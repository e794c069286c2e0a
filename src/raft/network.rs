//! Client side of the peer network (placeholder until written below).
