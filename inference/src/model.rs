//! Loading a Hugging Face model directory into the architecture its `config.json` names.

use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind};

use crate::checkpoint::{Checkpoint, Loader};
use crate::config::{Architecture, declared_kind, fp8_block};
use crate::error::LoadError;
use crate::models::{Transformer, minimax_m2, qwen2, qwen3, qwen3_moe};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The dtype to run in; `None` takes the checkpoint's (upstream's `dtype: "auto"`), float32
    /// when it declares none.
    pub dtype: Option<Kind>,
    /// The devices the layers spread over, in order.
    pub devices: Vec<Device>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: None, devices: vec![Device::Cpu] }
    }
}

/// Reads `config.json` in `dir`.
pub fn read_config(dir: &Path) -> Result<Value, LoadError> {
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|source| LoadError::Io { path: path.clone(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| LoadError::Json { path, source })
}

pub fn load(dir: &Path, options: &LoadOptions) -> Result<Transformer, LoadError> {
    let config = read_config(dir)?;
    let architecture = Architecture::from_config(&config)?;
    let kind = match options.dtype {
        Some(kind) => kind,
        None => declared_kind(&config)?.unwrap_or(Kind::Float),
    };
    let devices = if options.devices.is_empty() { vec![Device::Cpu] } else { options.devices.clone() };
    let block = fp8_block(&config)?;
    let checkpoint = Checkpoint::open(dir)?;
    let root = Loader::new(&checkpoint, kind, devices[0]).with_fp8_block(block);
    let parse = |e: serde_json::Error| LoadError::InvalidConfig(e.to_string());
    match architecture {
        Architecture::Qwen2 => {
            qwen2::load(&serde_json::from_value::<qwen2::Config>(config).map_err(parse)?, &root, &devices)
        }
        Architecture::Qwen3 => {
            qwen3::load(&serde_json::from_value::<qwen3::Config>(config).map_err(parse)?, &root, &devices)
        }
        Architecture::Qwen3Moe => {
            qwen3_moe::load(&serde_json::from_value::<qwen3_moe::Config>(config).map_err(parse)?, &root, &devices)
        }
        Architecture::MiniMaxM2 => {
            minimax_m2::load(&serde_json::from_value::<minimax_m2::Config>(config).map_err(parse)?, &root, &devices)
        }
    }
}

/// Bytes the weights of the model in `dir` take in `dtype` (their stored dtypes when `None`),
/// from the checkpoint's headers: what loading will allocate before any activation or cache.
/// FP8 weights stay FP8 whatever the dtype. Layers past `num_hidden_layers` are not loaded
/// (MiniMax-M2's and DeepSeek's multi-token-prediction modules, stored as `model.layers.N` after
/// the last decoder layer, serve speculative decoding, which the engine does not do) and are not
/// counted: three of MiniMax-M2.7's, about 11 GB.
pub fn weight_bytes(dir: &Path, dtype: Option<Kind>) -> Result<u64, LoadError> {
    let layers = read_config(dir)?.get("num_hidden_layers").and_then(Value::as_u64);
    let checkpoint = Checkpoint::open(dir)?;
    Ok(checkpoint
        .tensor_sizes()
        .filter(|(name, ..)| layers.is_none_or(|layers| layer_index(name).is_none_or(|i| i < layers)))
        .map(|(_, elements, stored_bytes, fp8)| match dtype {
            Some(kind) if !fp8 => elements * kind.elt_size_in_bytes() as u64,
            _ => stored_bytes,
        })
        .sum())
}

/// `N` of a tensor under `model.layers.N.`.
fn layer_index(name: &str) -> Option<u64> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_past_the_configs_count_are_not_counted() {
        let dir = tempfile::tempdir().unwrap();
        // 4×4 float32 tensors (64 bytes each): two decoder layers, the embedding and an MTP
        // layer after them.
        let names = ["model.embed_tokens.weight", "model.layers.0.w", "model.layers.1.w", "model.layers.2.w"];
        let tensors: Vec<(String, tch::Tensor)> =
            names.iter().map(|n| (n.to_string(), tch::Tensor::ones([4, 4], (Kind::Float, tch::Device::Cpu)))).collect();
        tch::Tensor::write_safetensors(&tensors, dir.path().join("model.safetensors")).unwrap();
        let config = |layers: &str| std::fs::write(dir.path().join("config.json"), layers).unwrap();
        config(r#"{"num_hidden_layers": 2}"#);
        assert_eq!(weight_bytes(dir.path(), None).unwrap(), 3 * 64);
        assert_eq!(weight_bytes(dir.path(), Some(Kind::BFloat16)).unwrap(), 3 * 32);
        config(r#"{"num_hidden_layers": 3}"#);
        assert_eq!(weight_bytes(dir.path(), None).unwrap(), 4 * 64);
        // Without the count, everything.
        config("{}");
        assert_eq!(weight_bytes(dir.path(), None).unwrap(), 4 * 64);
        assert_eq!(layer_index("model.layers.12.mlp.w"), Some(12));
        assert_eq!(layer_index("model.layersX.1"), None);
        assert_eq!(layer_index("lm_head.weight"), None);
    }
}
