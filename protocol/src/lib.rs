//! Wire shapes shared by the operator, the node-daemon and the devnet, defined once.
//!
//! - [`admin`]: the network node's admin API (ML-node registration), as upstream's dapi serves it.
//! - [`daemon_config`]: the daemon's configuration file, rendered by the operator into each
//!   GonkaNode's ConfigMap.
//! - [`ml_node`]: the Gonka ML-node management API, in upstream's JSON shapes.
//! - [`network`]: the network node's public epoch answer (PoC windows).
//! - [`openai`]: the inference port's OpenAI-compatible API, as vLLM serves it.
//! - [`pow`]: PoC v1's init request, proof and validation batches, model params.
//! - [`pow_v2`]: PoC v2's requests, answers and artifact callbacks.
//! - [`report`]: the daemon → operator report stream (gRPC, `proto/gonka/report/v1`).

pub mod admin;
pub mod daemon_config;
pub mod ml_node;
pub mod network;
pub mod openai;
pub mod pow;
pub mod pow_v2;
pub mod report;
