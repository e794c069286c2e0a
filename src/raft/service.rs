//! Server side of the peer network.
