//! Cluster tests: the real `taskraft` binary as three processes on
//! 127.0.0.1. One test binary; each module is one area.

mod api;
mod bad_input;
mod catch_up;
mod dependencies;
mod execution;
mod failover;
mod membership;
mod metrics;
mod nemesis;
mod periodic;
mod power_cut;
mod queues;
mod replication;
mod simulation;
