//! Wire shapes shared by the operator, the node-daemon and (later) the devnet, defined once.
//!
//! - [`daemon_config`]: the daemon's configuration file, rendered by the operator into each
//!   GonkaNode's ConfigMap.
//! - [`ml_node`]: the Gonka ML-node management API, in upstream's JSON shapes.
//! - [`pow`]: PoC v1's init request, proof and validation batches, model params.

pub mod daemon_config;
pub mod ml_node;
pub mod pow;
