//! Wire shapes shared by the operator, the node-daemon and the devnet, defined once.
//!
//! - [`admin`]: the network node's admin API (ML-node registration), as upstream's dapi serves it.
//! - [`daemon_config`]: the daemon's configuration file, rendered by the operator into each
//!   GonkaNode's ConfigMap.
//! - [`ml_node`]: the Gonka ML-node management API, in upstream's JSON shapes.
//! - [`network`]: the network node's public epoch answer (PoC windows).
//! - [`pow`]: PoC v1's init request, proof and validation batches, model params.
//! - [`report`]: the daemon → operator report stream (gRPC, `proto/gonka/report/v1`).

pub mod admin;
pub mod daemon_config;
pub mod ml_node;
pub mod network;
pub mod pow;
pub mod report;
