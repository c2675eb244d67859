//! PoC v1 on the wire, in upstream's shapes (`pow/service/manager.py`, `pow/data.py`,
//! `decentralized-api/mlnodeclient/poc.go`): the init request the network node sends, the
//! proof batches ML nodes post back, validation results, and the proof model's `Params`.

use serde::{Deserialize, Serialize};

/// `POST /api/v1/pow/init`, `/pow/init/generate`, `/pow/init/validate` (upstream
/// `PowInitRequestUrl`, a pydantic model: unknown fields are ignored).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InitRequest {
    // Fields in the order upstream's Go `InitDto` marshals them.
    pub block_hash: String,
    pub block_height: i64,
    pub public_key: String,
    pub batch_size: usize,
    pub r_target: f64,
    pub fraud_threshold: f64,
    #[serde(default = "default_params")]
    pub params: Params,
    /// The ML node's number in the broker (`node_num`); -1 = not set.
    #[serde(default = "unset")]
    pub node_id: i64,
    /// How many ML nodes take part; -1 = not set.
    #[serde(default = "unset")]
    pub node_count: i64,
    /// Callback base: batches go to `{url}/generated` and `{url}/validated`.
    pub url: String,
}

fn unset() -> i64 {
    -1
}

fn default_params() -> Params {
    serde_json::from_value(serde_json::json!({})).expect("defaults")
}

/// Nonces and their distances (upstream `ProofBatch`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ProofBatch {
    pub public_key: String,
    pub block_hash: String,
    pub block_height: i64,
    pub nonces: Vec<i64>,
    pub dist: Vec<f64>,
    pub node_id: i64,
}

impl ProofBatch {
    /// The nonces that are proofs: distance below `r_target` (upstream `sub_batch`).
    pub fn proofs(&self, r_target: f64) -> ProofBatch {
        let (nonces, dist) =
            self.nonces.iter().zip(&self.dist).filter(|(_, d)| **d < r_target).map(|(n, d)| (*n, *d)).unzip();
        ProofBatch { nonces, dist, ..self.clone() }
    }
}

/// A recomputed batch and the verdict (upstream `ValidatedBatch`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ValidatedBatch {
    pub public_key: String,
    pub block_hash: String,
    pub block_height: i64,
    pub nonces: Vec<i64>,
    /// Distances as recomputed here.
    pub dist: Vec<f64>,
    pub node_id: i64,
    /// Distances the prover claimed.
    pub received_dist: Vec<f64>,
    pub r_target: f64,
    pub fraud_threshold: f64,
    pub n_invalid: i64,
    pub probability_honest: f64,
    pub fraud_detected: bool,
}

/// Upstream's `PowState`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PowState {
    Idle,
    #[serde(rename = "NOT_LOADED")]
    NotLoaded,
    Loading,
    Generating,
    Validating,
    Stopped,
    Mixed,
}

/// `GET /api/v1/pow/status`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PowStatus {
    pub status: PowState,
    /// Absent before any init, like upstream's `{"status": "NOT_LOADED"}`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub is_model_initialized: Option<bool>,
}

/// `{"status": "OK", "pow_status": ...}`, the answer of the init and phase calls.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PowResponse {
    pub status: String,
    pub pow_status: PowStatus,
}

/// The proof model's shape (`params` of the init request; upstream `pow.models.utils.Params`, a
/// dataclass read by pydantic: every field has a default, unknown fields are ignored).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Params {
    #[serde(default = "d_dim")]
    pub dim: usize,
    #[serde(default = "d_layers")]
    pub n_layers: usize,
    #[serde(default = "d_heads")]
    pub n_heads: usize,
    /// Upstream's default is 16 whatever `n_heads` is.
    #[serde(default = "d_kv_heads")]
    pub n_kv_heads: usize,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_ffn")]
    pub ffn_dim_multiplier: Option<f64>,
    #[serde(default = "d_multiple_of")]
    pub multiple_of: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub use_scaled_rope: bool,
    #[serde(default = "d_seq")]
    pub seq_len: usize,
}

fn d_dim() -> usize {
    2048
}
fn d_layers() -> usize {
    16
}
fn d_heads() -> usize {
    16
}
fn d_kv_heads() -> usize {
    16
}
fn d_vocab() -> usize {
    8192
}
fn d_ffn() -> Option<f64> {
    Some(1.3)
}
fn d_multiple_of() -> usize {
    1024
}
fn d_eps() -> f64 {
    1e-5
}
fn d_theta() -> f64 {
    500_000.0
}
fn d_seq() -> usize {
    16
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid PoC params: {0}")]
pub struct ParamsError(pub String);

/// Bounds on the proof model's shape (mainnet's is 1792 / 64 / 64 / 8196 / 256).
pub const MAX_DIM: usize = 1 << 16;
pub const MAX_LAYERS: usize = 1024;
pub const MAX_HEADS: usize = 1024;
pub const MAX_VOCAB: usize = 1 << 20;
pub const MAX_SEQ_LEN: usize = 1 << 16;
pub const MAX_FFN_MULTIPLIER: f64 = 1024.0;

impl Params {
    /// Mainnet's set (`MainNetParams` in the network node, `PARAMS_V2` in the ML node).
    pub fn mainnet() -> Self {
        Self {
            dim: 1792,
            n_layers: 64,
            n_heads: 64,
            n_kv_heads: 64,
            vocab_size: 8196,
            ffn_dim_multiplier: Some(10.0),
            multiple_of: 4 * 2048,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            use_scaled_rope: false,
            seq_len: 256,
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// The SwiGLU hidden size, by upstream's arithmetic (truncating casts included).
    pub fn ffn_hidden(&self) -> usize {
        let mut hidden = (2.0 * (4 * self.dim) as f64 / 3.0) as usize;
        if let Some(m) = self.ffn_dim_multiplier {
            hidden = (m * hidden as f64) as usize;
        }
        self.multiple_of * hidden.div_ceil(self.multiple_of)
    }

    /// Checks upstream's `ModelArgs` assertions, what a forward pass needs, and bounds every
    /// dimension (far above any model the network has used) so that sizes computed from them
    /// can't overflow; whether the model fits an ML node's memory is [`Params::memory_bytes`].
    pub fn validate(&self) -> Result<(), ParamsError> {
        let fail = |m: &str| Err(ParamsError(m.into()));
        if self.dim == 0 || self.n_layers == 0 || self.n_heads == 0 || self.vocab_size == 0 || self.seq_len == 0 {
            return fail("dim, n_layers, n_heads, vocab_size and seq_len must be positive");
        }
        for (name, value, max) in [
            ("dim", self.dim, MAX_DIM),
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("n_heads", self.n_heads, MAX_HEADS),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("seq_len", self.seq_len, MAX_SEQ_LEN),
            ("multiple_of", self.multiple_of, MAX_DIM),
        ] {
            if value > max {
                return Err(ParamsError(format!("{name} {value} is above the limit of {max}")));
            }
        }
        if let Some(m) = self.ffn_dim_multiplier
            && !(m.is_finite() && m > 0.0 && m <= MAX_FFN_MULTIPLIER)
        {
            return Err(ParamsError(format!(
                "ffn_dim_multiplier {m} must be above 0 and at most {MAX_FFN_MULTIPLIER}"
            )));
        }
        if self.multiple_of == 0 {
            return fail("multiple_of must be positive");
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return fail("dim must be a multiple of n_heads");
        }
        if !self.head_dim().is_multiple_of(2) {
            return fail("dim / n_heads must be even (rotary embeddings pair dimensions)");
        }
        let kv = self.kv_heads();
        if kv == 0 || kv > self.n_heads || !self.n_heads.is_multiple_of(kv) {
            return fail("n_kv_heads must divide n_heads");
        }
        Ok(())
    }

    /// Parameter names and shapes in `named_parameters()` order of upstream's `Transformer`.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let (dim, hd, kv, hidden) = (self.dim, self.head_dim(), self.kv_heads(), self.ffn_hidden());
        let mut out = vec![("tok_embeddings.weight".to_string(), vec![self.vocab_size, dim])];
        for i in 0..self.n_layers {
            let p = |n: &str| format!("layers.{i}.{n}");
            out.push((p("attention.wq.weight"), vec![self.n_heads * hd, dim]));
            out.push((p("attention.wk.weight"), vec![kv * hd, dim]));
            out.push((p("attention.wv.weight"), vec![kv * hd, dim]));
            out.push((p("attention.wo.weight"), vec![dim, self.n_heads * hd]));
            out.push((p("feed_forward.w1.weight"), vec![hidden, dim]));
            out.push((p("feed_forward.w2.weight"), vec![dim, hidden]));
            out.push((p("feed_forward.w3.weight"), vec![hidden, dim]));
            out.push((p("attention_norm.weight"), vec![dim]));
            out.push((p("ffn_norm.weight"), vec![dim]));
        }
        out.push(("norm.weight".to_string(), vec![dim]));
        out.push(("output.weight".to_string(), vec![self.vocab_size, dim]));
        out
    }

    /// Bytes a forward pass of `batch_size` nonces needs: the weights at `weight_bytes` each
    /// (2 in float16, 4 in float32), and float32 activations of the widest steps (a layer's
    /// hidden states, FFN and attention scores, the logits). Saturating: call after
    /// [`Params::validate`] for a meaningful number.
    pub fn memory_bytes(&self, batch_size: usize, weight_bytes: u64) -> u64 {
        let n = |v: usize| v as u64;
        let (b, s) = (n(batch_size), n(self.seq_len));
        let weights = n(self.parameter_count()).saturating_mul(weight_bytes);
        let per_token = n(self.dim).saturating_mul(4).saturating_add(n(self.ffn_hidden()).saturating_mul(3));
        let hidden = b.saturating_mul(s).saturating_mul(per_token);
        let scores = b.saturating_mul(n(self.n_heads)).saturating_mul(s).saturating_mul(s);
        let logits = b.saturating_mul(n(self.vocab_size));
        weights.saturating_add(hidden.saturating_add(scores).saturating_add(logits).saturating_mul(4))
    }

    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mainnet_model_is_upstreams_18b() {
        let p = Params::mainnet();
        // multiple_of * ceil(10 * int(2 * 4 * 1792 / 3) / multiple_of) = 8192 * ceil(47780 / 8192)
        assert_eq!(p.ffn_hidden(), 49152);
        let billions = p.parameter_count() as f64 / 1e9;
        assert!((17.0..19.5).contains(&billions), "{billions}B parameters");
        assert!(p.validate().is_ok());
    }

    #[test]
    fn init_request_params_parse_with_upstream_defaults() {
        let p: Params = serde_json::from_value(serde_json::json!({"dim": 64, "n_layers": 2, "n_heads": 32})).unwrap();
        assert_eq!((p.vocab_size, p.seq_len, p.kv_heads(), p.rope_theta), (8192, 16, 16, 500_000.0));
        // Unknown fields are ignored, as pydantic does; a null where upstream wants an int is not.
        let p: Params = serde_json::from_value(serde_json::json!({"dims": 64, "n_heads": 16})).unwrap();
        assert_eq!((p.dim, p.n_heads), (2048, 16));
        assert!(serde_json::from_value::<Params>(serde_json::json!({"n_kv_heads": null})).is_err());
    }

    #[test]
    fn rejects_shapes_upstream_asserts_against() {
        let base =
            Params { dim: 64, n_heads: 4, n_kv_heads: 4, n_layers: 1, vocab_size: 32, seq_len: 4, ..Params::mainnet() };
        assert!(base.validate().is_ok());
        assert!(Params { n_heads: 5, ..base.clone() }.validate().is_err());
        assert!(Params { n_kv_heads: 3, ..base.clone() }.validate().is_err());
        assert!(Params { seq_len: 0, ..base.clone() }.validate().is_err());
        let err = Params { dim: 1 << 20, n_heads: 4, ..base.clone() }.validate().unwrap_err();
        assert_eq!(err.0, "dim 1048576 is above the limit of 65536");
        assert!(Params { ffn_dim_multiplier: Some(f64::INFINITY), ..base }.validate().is_err());
    }

    #[test]
    fn memory_is_counted_for_weights_and_one_batch() {
        let p = Params::mainnet();
        // 18.4B parameters in float16 are about 34 GiB; upstream's GPU groups want 38 GB.
        let gib = p.memory_bytes(32, 2) as f64 / (1u64 << 30) as f64;
        assert!((34.0..40.0).contains(&gib), "{gib} GiB");
        assert!(p.memory_bytes(64, 2) > p.memory_bytes(32, 2));
        let huge = Params { dim: MAX_DIM, n_layers: MAX_LAYERS, n_heads: MAX_HEADS, ..p };
        assert!(huge.memory_bytes(4096, 4) > 1 << 50, "saturates, never wraps");
    }
}
