//! The engine's errors. Loading is where things go wrong in ways an operator can fix (a missing
//! shard, an unsupported architecture, a model too large for its GPUs), so each says which.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("no model.safetensors or model.safetensors.index.json in {0}")]
    NoWeights(PathBuf),
    #[error(
        "model_type {model_type:?} (architectures {architectures:?}) is not supported: this engine runs qwen2, qwen3, qwen3_moe and minimax_m2"
    )]
    UnsupportedArchitecture { model_type: String, architectures: String },
    #[error("dtype {0:?} is not supported (float16, bfloat16, float32)")]
    UnsupportedDtype(String),
    #[error("config.json: {0}")]
    InvalidConfig(String),
    /// The checkpoint's weights are quantised in a way the engine does not load.
    #[error("its weights are {0}")]
    Quantization(String),
    #[error("tensor {0} is not in the checkpoint")]
    MissingTensor(String),
    #[error("tensor {name} has shape {found:?}, the config implies {expected:?}")]
    Shape { name: String, expected: Vec<i64>, found: Vec<i64> },
    #[error("tensor {name} is stored as {dtype}, which this engine does not load")]
    TensorDtype { name: String, dtype: String },
    #[error("placing the layers: {0}")]
    Placement(#[from] crate::placement::PlacementError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}
