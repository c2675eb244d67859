//! What every architecture's `config.json` shares: which architecture it is, the weights' dtype
//! and the rotary-embedding settings, in both spellings Hugging Face has used (`rope_theta` +
//! `rope_scaling` in checkpoints written by transformers 4, `rope_parameters` in 5).

use serde::Deserialize;
use serde_json::Value;
use tch::Kind;

use crate::error::LoadError;

/// The architectures this engine runs, from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Qwen2, Qwen2.5, QwQ.
    Qwen2,
    /// Qwen3 dense.
    Qwen3,
    /// Qwen3 mixture of experts (Qwen3-30B-A3B, Qwen3-235B-A22B).
    Qwen3Moe,
    /// MiniMax-M2, M2.5, M2.7.
    MiniMaxM2,
    /// DeepSeek-V4, DeepSeek-V4-Flash.
    DeepseekV4,
    /// GLM-5.3-Flash's language model.
    Glm5Next,
}

impl Architecture {
    pub fn from_config(config: &Value) -> Result<Self, LoadError> {
        let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("");
        match model_type {
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "qwen3_moe" => Ok(Self::Qwen3Moe),
            "minimax_m2" => Ok(Self::MiniMaxM2),
            "deepseek_v4" => Ok(Self::DeepseekV4),
            "glm5_next" => Ok(Self::Glm5Next),
            other => Err(LoadError::UnsupportedArchitecture {
                model_type: other.to_string(),
                architectures: config
                    .get("architectures")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
            }),
        }
    }
}

/// The language model's config: where a multimodal checkpoint (GLM-5.3-Flash's) nests it under
/// `text_config`, that, with the outer fields it lacks (the dtype, the quantisation) and the
/// outer model type; else the whole config (a text-only checkpoint keeps the fields at the top
/// level).
pub fn text_config(config: &Value) -> Value {
    let Some(Value::Object(text)) = config.get("text_config") else { return config.clone() };
    let mut merged = text.clone();
    if let Value::Object(outer) = config {
        for (key, value) in outer {
            if !matches!(key.as_str(), "text_config" | "vision_config") && !merged.contains_key(key) {
                merged.insert(key.clone(), value.clone());
            }
        }
        // The architecture is the checkpoint's (`glm5_next`), not the text model's class.
        if let Some(model_type) = outer.get("model_type") {
            merged.insert("model_type".into(), model_type.clone());
        }
    }
    Value::Object(merged)
}

/// The weights' dtype as the checkpoint declares it (`torch_dtype`, or `dtype` since
/// transformers 5); `None` when it says nothing.
pub fn declared_kind(config: &Value) -> Result<Option<Kind>, LoadError> {
    match config.get("dtype").or_else(|| config.get("torch_dtype")).and_then(Value::as_str) {
        None => Ok(None),
        Some(name) => parse_dtype(name).map(Some),
    }
}

/// A dtype by the names upstream's `/inference/up` and Hugging Face configs use.
pub fn parse_dtype(name: &str) -> Result<Kind, LoadError> {
    match name {
        "float16" | "half" | "fp16" => Ok(Kind::Half),
        "bfloat16" | "bf16" => Ok(Kind::BFloat16),
        "float32" | "float" | "fp32" => Ok(Kind::Float),
        other => Err(LoadError::UnsupportedDtype(other.to_string())),
    }
}

/// The scaling blocks of a checkpoint quantised to FP8 in blocks (`quantization_config`
/// `{"quant_method": "fp8", "weight_block_size": [rows, columns]}`, as DeepSeek's and MiniMax's
/// releases are), `None` for an unquantised one; any other quantisation is refused, named.
pub fn fp8_block(config: &Value) -> Result<Option<[i64; 2]>, LoadError> {
    let Some(q) = config.get("quantization_config").filter(|q| !q.is_null()) else { return Ok(None) };
    let field = |name: &str| q.get(name).and_then(Value::as_str);
    let method = field("quant_method").unwrap_or("unknown method");
    let refuse = |why: String| Err(LoadError::Quantization(format!("quantised ({method}): {why}")));
    if method != "fp8" {
        return refuse("the native engine loads FP8 block-quantised weights only".into());
    }
    if let Some(fmt) = field("fmt").filter(|f| !matches!(*f, "e4m3" | "float8_e4m3fn")) {
        return refuse(format!("FP8 format {fmt:?} (e4m3 is supported)"));
    }
    if let Some(scheme) = field("activation_scheme").filter(|s| *s != "dynamic") {
        return refuse(format!("activation_scheme {scheme:?} (dynamic is supported)"));
    }
    let block: Option<Vec<i64>> = q.get("weight_block_size").and_then(|b| serde_json::from_value(b.clone()).ok());
    match block.as_deref() {
        Some(&[rows, columns]) if rows > 0 && columns > 0 => Ok(Some([rows, columns])),
        _ => refuse("per-tensor scales (no weight_block_size [rows, columns]) are not supported".into()),
    }
}

/// The rotary-embedding fields of a config, both spellings.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeFields {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
}

/// How positions become rotation frequencies.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// YaRN (Qwen2.5/Qwen3's long-context setting).
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeFields {
    /// The rope settings, as transformers' `standardize_rope_params` reads them.
    pub fn resolve(&self, max_position_embeddings: usize) -> Result<Rope, LoadError> {
        let params = self
            .rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(Value::Object(Default::default()));
        let field = |name: &str| params.get(name).filter(|v| !v.is_null());
        let number = |name: &str| field(name).and_then(Value::as_f64);
        let theta = number("rope_theta").or(self.rope_theta).unwrap_or(10_000.0);
        let rope_type = field("rope_type").or_else(|| field("type")).and_then(Value::as_str).unwrap_or("default");
        let invalid = |what: &str| LoadError::InvalidConfig(format!("rope {rope_type}: {what}"));
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: number("factor").ok_or_else(|| invalid("factor missing"))? },
            "yarn" => RopeScaling::Yarn {
                factor: number("factor").ok_or_else(|| invalid("factor missing"))?,
                original_max_position_embeddings: number("original_max_position_embeddings")
                    .unwrap_or(max_position_embeddings as f64),
                // transformers reads these with `or`, so 0 and null both mean the default.
                beta_fast: number("beta_fast").filter(|b| *b != 0.0).unwrap_or(32.0),
                beta_slow: number("beta_slow").filter(|b| *b != 0.0).unwrap_or(1.0),
                attention_factor: number("attention_factor"),
                mscale: number("mscale"),
                mscale_all_dim: number("mscale_all_dim"),
                truncate: field("truncate").and_then(Value::as_bool).unwrap_or(true),
            },
            other => return Err(LoadError::InvalidConfig(format!("rope type {other:?} is not supported"))),
        };
        Ok(Rope { theta, scaling })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The text config of a multimodal checkpoint takes the outer dtype and model type; a flat
    /// one is itself.
    #[test]
    fn the_text_config_takes_what_it_lacks_from_the_checkpoints() {
        let nested = json!({"model_type": "glm5_next", "dtype": "bfloat16", "tie_word_embeddings": false,
            "vision_config": {"depth": 1}, "text_config": {"model_type": "glm5_next_text", "hidden_size": 64,
            "tie_word_embeddings": true}});
        let text = text_config(&nested);
        assert_eq!(text["model_type"], "glm5_next");
        assert_eq!(text["dtype"], "bfloat16");
        assert_eq!(text["hidden_size"], 64);
        assert_eq!(text["tie_word_embeddings"], true, "the text model's own field wins");
        assert!(text.get("vision_config").is_none() && text.get("text_config").is_none());
        let flat = json!({"model_type": "glm5_next", "hidden_size": 64});
        assert_eq!(text_config(&flat), flat);
    }

    fn rope(v: Value) -> Result<Rope, LoadError> {
        serde_json::from_value::<RopeFields>(v).unwrap().resolve(4096)
    }

    #[test]
    fn both_spellings_resolve() {
        let old = rope(json!({"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 32768}}))
        .unwrap();
        let new = rope(json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
            "original_max_position_embeddings": 32768}}))
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(old.theta, 1e6);
        assert!(matches!(old.scaling, RopeScaling::Yarn { factor: 4.0, beta_fast: 32.0, beta_slow: 1.0, .. }));
        assert_eq!(rope(json!({"rope_theta": 5.0, "rope_scaling": null})).unwrap().scaling, RopeScaling::Default);
        assert_eq!(rope(json!({})).unwrap().theta, 10_000.0);
    }

    #[test]
    fn unknown_rope_type_and_architecture_are_named() {
        let err = rope(json!({"rope_scaling": {"type": "longrope"}})).unwrap_err();
        assert!(err.to_string().contains("longrope"), "{err}");
        let err = rope(json!({"rope_scaling": {"type": "linear"}})).unwrap_err();
        assert!(err.to_string().contains("factor"), "{err}");
        let err = Architecture::from_config(&json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
            .unwrap_err();
        assert!(err.to_string().contains("llama") && err.to_string().contains("LlamaForCausalLM"), "{err}");
    }

    #[test]
    fn dtypes_by_upstream_names() {
        assert_eq!(declared_kind(&json!({"torch_dtype": "bfloat16"})).unwrap(), Some(Kind::BFloat16));
        assert_eq!(declared_kind(&json!({"dtype": "float16"})).unwrap(), Some(Kind::Half));
        assert_eq!(declared_kind(&json!({})).unwrap(), None);
        assert!(parse_dtype("int4").is_err());
    }
}
