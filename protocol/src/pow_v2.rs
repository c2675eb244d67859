//! PoC v2, the network node ↔ ML node shapes: the requests the 2026 network node sends
//! (`decentralized-api/mlnodeclient/poc_v2_requests.go`) to `/api/v1/inference/pow/*`, the
//! answers upstream's ML node gives (`mlnode/.../inference/pow_v2_routes.py` over vLLM's
//! `vllm/poc/routes.py`), and the callbacks to `{url}/generated` and `{url}/validated`
//! (`GeneratedArtifactBatchV2`, `ValidatedResultV2`).
//!
//! Requests read as pydantic reads them: unknown top-level fields ignored, `params` strict
//! (`extra="forbid"`), defaults where upstream has them.

use serde::{Deserialize, Serialize};

/// Upstream's `k_dim` default.
pub const DEFAULT_K_DIM: i64 = 12;
/// vLLM's `POC_BATCH_SIZE_DEFAULT`.
pub const DEFAULT_BATCH_SIZE: usize = 32;

fn default_k_dim() -> i64 {
    DEFAULT_K_DIM
}

fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}

/// `params` (`PoCParamsModel`, `extra="forbid"`): the network node omits `k_dim`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PocParams {
    pub model: String,
    pub seq_len: i64,
    #[serde(default = "default_k_dim")]
    pub k_dim: i64,
}

/// `POST /api/v1/inference/pow/init/generate`: generate from this ML node's nonce sequence
/// until stopped, artifacts posted to `{url}/generated`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InitGenerateRequest {
    pub block_hash: String,
    pub block_height: i64,
    pub public_key: String,
    pub node_id: i64,
    pub node_count: i64,
    /// vLLM's backend-level fields, injected by upstream's ML node (one group here).
    #[serde(default)]
    pub group_id: i64,
    #[serde(default = "one")]
    pub n_groups: i64,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    pub params: PocParams,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub poc_stronger_rng: bool,
}

fn one() -> i64 {
    1
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    pub nonce: i64,
    pub vector_b64: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Validation {
    pub artifacts: Vec<Artifact>,
}

/// `stat_test` (`StatTestModel`): vLLM's defaults. The network node also sends
/// `p_value_threshold`, which upstream's model ignores (unknown field), leaving
/// `fraud_threshold` at its default — reproduced here, see `docs` and the reference.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StatTest {
    #[serde(default = "default_dist_threshold")]
    pub dist_threshold: f64,
    #[serde(default = "default_p_mismatch")]
    pub p_mismatch: f64,
    #[serde(default = "default_fraud_threshold")]
    pub fraud_threshold: f64,
}

fn default_dist_threshold() -> f64 {
    0.02
}
fn default_p_mismatch() -> f64 {
    0.001
}
fn default_fraud_threshold() -> f64 {
    0.01
}

impl Default for StatTest {
    fn default() -> Self {
        Self {
            dist_threshold: default_dist_threshold(),
            p_mismatch: default_p_mismatch(),
            fraud_threshold: default_fraud_threshold(),
        }
    }
}

/// `POST /api/v1/inference/pow/generate`: compute given nonces (and, with `validation`, compare
/// them with another ML node's artifacts).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub block_hash: String,
    pub block_height: i64,
    pub public_key: String,
    pub node_id: i64,
    pub node_count: i64,
    pub nonces: Vec<i64>,
    pub params: PocParams,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default)]
    pub wait: bool,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub validation: Option<Validation>,
    #[serde(default)]
    pub stat_test: Option<StatTest>,
    #[serde(default)]
    pub poc_stronger_rng: bool,
}

/// `{"dtype": "f16", "k_dim": 12, "endian": "le"}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Encoding {
    pub dtype: String,
    pub k_dim: i64,
    pub endian: String,
}

impl Encoding {
    pub fn f16_le(k_dim: i64) -> Self {
        Self { dtype: "f16".into(), k_dim, endian: "le".into() }
    }
}

/// The `{url}/generated` callback.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GeneratedArtifactBatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub block_hash: String,
    pub block_height: i64,
    pub public_key: String,
    pub node_id: i64,
    pub artifacts: Vec<Artifact>,
    pub encoding: Encoding,
}

/// A validation's outcome: the `{url}/validated` callback body (with the request's identity)
/// and the fields of a completed validation answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ValidatedResult {
    pub request_id: String,
    pub block_hash: String,
    pub block_height: i64,
    pub public_key: String,
    pub node_id: i64,
    pub n_total: i64,
    pub n_mismatch: i64,
    pub mismatch_nonces: Vec<i64>,
    pub p_value: f64,
    pub fraud_detected: bool,
}

/// One vLLM backend in the ML node's fan-out answers (`{"port", "status"}`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BackendResult {
    pub port: u16,
    pub status: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BackendError {
    pub port: u16,
    pub error: String,
}

/// `init/generate`'s answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InitGenerateResponse {
    pub status: String,
    pub backends: usize,
    pub n_groups: usize,
    pub results: Vec<BackendResult>,
    /// `null` when every backend took it.
    pub errors: Option<Vec<BackendError>>,
}

/// `stop`'s answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StopResponse {
    pub status: String,
    pub results: Vec<BackendResult>,
    pub errors: Option<Vec<BackendError>>,
}

/// `status`' answer: `IDLE`, `GENERATING`, `MIXED` or `NO_BACKENDS`, with each backend's own.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StatusResponse {
    pub status: String,
    pub backends: Vec<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_network_nodes_requests_parse_with_upstreams_defaults() {
        // As Go's encoding/json writes PoCInitGenerateRequestV2 (no batch_size, no k_dim).
        let init: InitGenerateRequest = serde_json::from_value(json!({"block_hash": "h", "block_height": 10,
            "public_key": "pk", "node_id": 1, "node_count": 3, "params": {"model": "Qwen/Qwen3-0.6B", "seq_len": 256},
            "url": "http://api:9100/v2/poc-batches/Qwen%2FQwen3-0.6B", "poc_stronger_rng": true}))
        .unwrap();
        assert_eq!((init.batch_size, init.params.k_dim, init.group_id, init.n_groups), (32, 12, 0, 1));
        // params is strict, the rest is not.
        let err = serde_json::from_value::<InitGenerateRequest>(json!({"block_hash": "h", "block_height": 1,
            "public_key": "pk", "node_id": 0, "node_count": 1, "params": {"model": "m", "seq_len": 4, "poc_stronger_rng": true}}))
        .unwrap_err();
        assert!(err.to_string().contains("poc_stronger_rng"), "{err}");
        let generate: GenerateRequest = serde_json::from_value(json!({"block_hash": "h", "block_height": 1,
            "public_key": "pk", "node_id": 0, "node_count": 1, "nonces": [1, 2], "params": {"model": "m", "seq_len": 4},
            "validation": {"artifacts": [{"nonce": 1, "vector_b64": "AA=="}]},
            "stat_test": {"dist_threshold": 0.4, "p_mismatch": 0.1, "p_value_threshold": 0.05}, "unknown": 1}))
        .unwrap();
        // p_value_threshold is not a field of upstream's StatTestModel: fraud_threshold stays 0.01.
        assert_eq!(
            generate.stat_test.unwrap(),
            StatTest { dist_threshold: 0.4, p_mismatch: 0.1, fraud_threshold: 0.01 }
        );
        assert!(!generate.wait);
    }
}
