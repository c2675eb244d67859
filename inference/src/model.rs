//! Loading a Hugging Face model directory into the architecture its `config.json` names.

use std::path::Path;

use serde_json::Value;
use tch::{Device, Kind};

use crate::checkpoint::{Checkpoint, Kept, Loader, TensorSize};
use crate::config::{Architecture, declared_kind, fp8_block, text_config};
use crate::error::LoadError;
use crate::models::{ModelSpec, Transformer, deepseek_v4, glm5_next, minimax_m2, qwen2, qwen3, qwen3_moe};
use crate::placement::{LayerBytes, layer_devices};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The dtype to run in; `None` takes the checkpoint's (upstream's `dtype: "auto"`), float32
    /// when it declares none.
    pub dtype: Option<Kind>,
    /// The devices the layers spread over, in order.
    pub devices: Vec<Device>,
    /// How many layers each of `devices` takes (a [`crate::placement::Placement`]'s runs);
    /// `None`: as even as they divide.
    pub layers_per_device: Option<Vec<usize>>,
    /// The dtype the KV cache keeps (FP8 e4m3 or e5m2: vLLM's `--kv-cache-dtype`); `None`: the
    /// model's.
    pub kv_cache_dtype: Option<Kind>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: None, devices: vec![Device::Cpu], layers_per_device: None, kv_cache_dtype: None }
    }
}

/// Reads `config.json` in `dir`: the language model's fields ([`text_config`]; a multimodal
/// checkpoint nests them).
pub fn read_config(dir: &Path) -> Result<Value, LoadError> {
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|source| LoadError::Io { path: path.clone(), source })?;
    let config: Value = serde_json::from_slice(&bytes).map_err(|source| LoadError::Json { path, source })?;
    Ok(text_config(&config))
}

/// The architecture of `config` where this engine runs it: one it knows, DeepSeek-V4 and
/// GLM-5.3-Flash with their layer types and quantisation checked; else why not. Read from the config alone, before
/// anything is loaded (the ML node picks an engine by it).
pub fn native_support(config: &Value) -> Result<Architecture, LoadError> {
    let architecture = Architecture::from_config(config)?;
    match architecture {
        Architecture::DeepseekV4 => deepseek_v4::check_native(config)?,
        Architecture::Glm5Next => glm5_next::check_native(config)?,
        _ => {}
    }
    Ok(architecture)
}

/// The dtype a model runs in: `dtype`, else the one its config declares, else float32.
fn run_kind(config: &Value, dtype: Option<Kind>) -> Result<Kind, LoadError> {
    Ok(match dtype {
        Some(kind) => kind,
        None => declared_kind(config)?.unwrap_or(Kind::Float),
    })
}

/// The shapes of the model in `dir` loaded with `options`, from its config alone (what a
/// placement needs before anything is loaded: a token's KV bytes, a forward's activations).
pub fn spec(dir: &Path, options: &LoadOptions) -> Result<ModelSpec, LoadError> {
    let config = read_config(dir)?;
    let architecture = native_support(&config)?;
    let kind = run_kind(&config, options.dtype)?;
    let parse = |e: serde_json::Error| LoadError::InvalidConfig(e.to_string());
    let shape = match architecture {
        Architecture::Qwen2 => qwen2::shape(&serde_json::from_value(config).map_err(parse)?, kind)?,
        Architecture::Qwen3 => qwen3::shape(&serde_json::from_value(config).map_err(parse)?, kind)?,
        Architecture::Qwen3Moe => qwen3_moe::shape(&serde_json::from_value(config).map_err(parse)?, kind)?,
        Architecture::MiniMaxM2 => minimax_m2::shape(&serde_json::from_value(config).map_err(parse)?, kind)?,
        Architecture::DeepseekV4 => deepseek_v4::shape(&serde_json::from_value(config).map_err(parse)?, kind)?,
        Architecture::Glm5Next => glm5_next::shape(&serde_json::from_value(config).map_err(parse)?, kind)?,
    };
    Ok(ModelSpec { kv_kind: kv_kind(kind, options.kv_cache_dtype)?, ..shape.spec })
}

/// The KV cache's dtype for a model running in `kind`.
fn kv_kind(kind: Kind, requested: Option<Kind>) -> Result<Kind, LoadError> {
    match requested {
        None => Ok(kind),
        Some(k) if k == kind || matches!(k, Kind::Float8e4m3fn | Kind::Float8e5m2) => Ok(k),
        Some(k) => Err(LoadError::InvalidConfig(format!(
            "a KV cache in {k:?} for a model running in {kind:?}: the cache keeps the model's dtype or FP8"
        ))),
    }
}

pub fn load(dir: &Path, options: &LoadOptions) -> Result<Transformer, LoadError> {
    let config = read_config(dir)?;
    let architecture = native_support(&config)?;
    let kind = run_kind(&config, options.dtype)?;
    let devices = if options.devices.is_empty() { vec![Device::Cpu] } else { options.devices.clone() };
    let layers = config
        .get("num_hidden_layers")
        .and_then(Value::as_u64)
        .ok_or_else(|| LoadError::InvalidConfig("num_hidden_layers is missing".into()))?;
    let placed = layer_devices(layers as usize, &devices, options.layers_per_device.as_deref())?;
    let block = fp8_block(&config)?;
    let checkpoint = Checkpoint::open(dir)?;
    let root = Loader::new(&checkpoint, kind, placed.first().copied().unwrap_or(devices[0])).with_fp8_block(block);
    let parse = |e: serde_json::Error| LoadError::InvalidConfig(e.to_string());
    let kv_kind = kv_kind(kind, options.kv_cache_dtype)?;
    let mut model = match architecture {
        Architecture::Qwen2 => {
            qwen2::load(&serde_json::from_value::<qwen2::Config>(config).map_err(parse)?, &root, &placed)
        }
        Architecture::Qwen3 => {
            qwen3::load(&serde_json::from_value::<qwen3::Config>(config).map_err(parse)?, &root, &placed)
        }
        Architecture::Qwen3Moe => {
            qwen3_moe::load(&serde_json::from_value::<qwen3_moe::Config>(config).map_err(parse)?, &root, &placed)
        }
        Architecture::MiniMaxM2 => {
            minimax_m2::load(&serde_json::from_value::<minimax_m2::Config>(config).map_err(parse)?, &root, &placed)
        }
        Architecture::DeepseekV4 => {
            deepseek_v4::load(&serde_json::from_value::<deepseek_v4::Config>(config).map_err(parse)?, &root, &placed)
        }
        Architecture::Glm5Next => {
            glm5_next::load(&serde_json::from_value::<glm5_next::Config>(config).map_err(parse)?, &root, &placed)
        }
    }?;
    model.spec.kv_kind = kv_kind;
    Ok(model)
}

/// Bytes the weights of the model in `dir` take in `dtype` (their stored dtypes when `None`),
/// from the checkpoint's headers: what loading will allocate before any activation or cache.
/// FP8 weights stay FP8 whatever the dtype. Layers loading leaves out ([`loaded_tensors`]) are
/// not counted: three of MiniMax-M2.7's, about 11 GB.
pub fn weight_bytes(dir: &Path, dtype: Option<Kind>) -> Result<u64, LoadError> {
    Ok(layer_bytes(dir, dtype)?.total())
}

/// [`weight_bytes`] by where loading puts them: each decoder layer's, the embedding's (and
/// anything else outside the layers), and the head's (`lm_head`, the final norm), for a
/// [`crate::placement::plan`].
pub fn layer_bytes(dir: &Path, dtype: Option<Kind>) -> Result<LayerBytes, LoadError> {
    let config = read_config(dir)?;
    let counted = config.get("num_hidden_layers").and_then(Value::as_u64);
    let checkpoint = Checkpoint::open(dir)?;
    let tied = config.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false)
        && !checkpoint.contains("lm_head.weight");
    let mut bytes = LayerBytes { embedding: 0, layers: vec![0; counted.unwrap_or(0) as usize], head: 0, tied };
    for (TensorSize { name, elements, bytes: stored_bytes, kept }, layer) in loaded_tensors(&config, &checkpoint) {
        let size = match (dtype, kept) {
            (Some(kind), Kept::Widened) => elements * kind.elt_size_in_bytes() as u64,
            (_, Kept::Index) => elements * 8,
            _ => stored_bytes,
        };
        match layer {
            Some(i) => {
                let i = i as usize;
                if bytes.layers.len() <= i {
                    bytes.layers.resize(i + 1, 0);
                }
                bytes.layers[i] += size;
            }
            // DeepSeek-V4's LM head is `head`, and its streams' final collapse goes with the norm
            // (`hc_head_*` where released, `model.hc_head.*` where transformers wrote it).
            None if HEAD_TENSORS.iter().any(|p| name.starts_with(p)) => bytes.head += size,
            None => bytes.embedding += size,
        }
    }
    Ok(bytes)
}

/// The most a forward holds at once of one decoder layer's FP8 weights widened to the dtype the
/// model runs in (`dtype`, else its config's): a mixture of experts widens a layer's experts
/// together for its grouped matmuls (all of them in a prefill), so this is working memory beside
/// the activations — MiniMax-M2.7's in bfloat16, about 7.3 GB. Zero for unquantised checkpoints.
pub fn fp8_widened_bytes(dir: &Path, dtype: Option<Kind>) -> Result<u64, LoadError> {
    let config = read_config(dir)?;
    let kind = run_kind(&config, dtype)?;
    let checkpoint = Checkpoint::open(dir)?;
    let mut per_layer: std::collections::BTreeMap<u64, u64> = Default::default();
    for (size, layer) in loaded_tensors(&config, &checkpoint) {
        if let (Some(i), Kept::Quantised { weights }) = (layer, size.kept) {
            *per_layer.entry(i).or_default() += weights;
        }
    }
    Ok(per_layer.values().max().copied().unwrap_or(0) * kind.elt_size_in_bytes() as u64)
}

/// The tensors loading reads from `checkpoint`, each with its decoder layer (`None` outside the
/// layers). Layers past the config's `num_hidden_layers` are not loaded
/// (MiniMax-M2's and DeepSeek's multi-token-prediction modules, stored as `model.layers.N` after
/// the last decoder layer, serve speculative decoding, which the engine does not do).
fn loaded_tensors<'a>(
    config: &Value,
    checkpoint: &'a Checkpoint,
) -> impl Iterator<Item = (TensorSize, Option<u64>)> + 'a {
    let counted = config.get("num_hidden_layers").and_then(Value::as_u64);
    checkpoint.tensor_sizes().filter_map(move |size| {
        // DeepSeek-V4's multi-token-prediction modules sit apart, under `mtp.` (transformers
        // skips `(^|\.)mtp\.` at load); a multimodal checkpoint's vision tower is not loaded.
        if size.name.starts_with("mtp.") || size.name.contains(".mtp.") || size.name.starts_with("model.visual.") {
            return None;
        }
        let layer = layer_index(&size.name);
        layer.is_none_or(|i| counted.is_none_or(|n| i < n)).then_some((size, layer))
    })
}

/// What loading puts with the LM head: the final norm, and DeepSeek-V4's final collapse of its
/// streams, in each spelling.
const HEAD_TENSORS: [&str; 7] =
    ["lm_head.", "head.", "model.norm.", "norm.", "model.hc_head.", "hc_head_", "model.language_model.norm."];

/// `N` of a tensor under `model.layers.N.` (or `layers.N.`, DeepSeek-V4's released spelling, or
/// `model.language_model.layers.N.`, a multimodal checkpoint's).
fn layer_index(name: &str) -> Option<u64> {
    ["model.layers.", "layers.", "model.language_model.layers."]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))?
        .split('.')
        .next()?
        .parse()
        .ok()
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

    #[test]
    fn layer_bytes_sort_tensors_where_loading_puts_them() {
        let dir = tempfile::tempdir().unwrap();
        let tensor = |n: i64| tch::Tensor::ones([n], (Kind::Float, tch::Device::Cpu));
        let write = |tensors: &[(&str, i64)]| {
            let tensors: Vec<(String, tch::Tensor)> =
                tensors.iter().map(|(n, len)| (n.to_string(), tensor(*len))).collect();
            tch::Tensor::write_safetensors(&tensors, dir.path().join("model.safetensors")).unwrap();
        };
        std::fs::write(dir.path().join("config.json"), r#"{"num_hidden_layers": 2, "tie_word_embeddings": true}"#)
            .unwrap();
        write(&[
            ("model.embed_tokens.weight", 10),
            ("model.layers.0.a", 3),
            ("model.layers.0.b", 4),
            ("model.layers.1.a", 5),
            ("model.layers.2.mtp", 100),
            ("model.norm.weight", 2),
        ]);
        let bytes = layer_bytes(dir.path(), None).unwrap();
        assert_eq!(bytes, LayerBytes { embedding: 40, layers: vec![28, 20], head: 8, tied: true });
        assert_eq!(weight_bytes(dir.path(), None).unwrap(), 96);
        // A stored lm_head is the head, tied or not, and is no copy of the embedding.
        write(&[
            ("model.embed_tokens.weight", 10),
            ("model.layers.0.a", 3),
            ("model.layers.1.a", 5),
            ("lm_head.weight", 10),
        ]);
        let bytes = layer_bytes(dir.path(), Some(Kind::BFloat16)).unwrap();
        assert_eq!(bytes, LayerBytes { embedding: 20, layers: vec![6, 10], head: 20, tied: false });
    }
}
