//! The ML node's inference engine on libtorch (tch): loads a Hugging Face checkpoint of the Qwen
//! family the Gonka network has served (Qwen2/Qwen2.5/QwQ, Qwen3 dense, Qwen3-MoE) and runs it
//! over batches of sequences with a KV cache.
//!
//! Layout (candle-transformers and mistral.rs): `config`, `checkpoint` and `tokenizer` read the
//! model directory; `layers` holds the shared modules; `models/` one file per architecture;
//! `kv_cache` and `batch` stay apart from the model code; `engine` is the continuous-batching
//! scheduler on its own thread (with `sampling`), `generate` plain greedy decoding, `poc_v2`
//! the PoC v2 computation on the loaded model, `packed_matmul` the CPU kernel for a MoE's
//! float32 experts over weights packed at load, `cpu_attention` the CPU kernel for the causal
//! attention of fresh sequences of one length, `cpu_threads` when and how their work is shared
//! among threads of ours.

pub mod batch;
pub mod chat_template_reads;
pub mod checkpoint;
pub mod config;
pub mod cpu_attention;
pub mod cpu_threads;
pub mod deepseek_v4_chat;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod layers;
pub mod model;
pub mod models;
pub mod packed_matmul;
pub mod placement;
pub mod poc_v2;
pub mod python_json;
pub mod sampling;
pub mod tokenizer;

pub use batch::{Output, Step, StepInput};
pub use error::LoadError;
pub use kv_cache::SequenceCache;
pub use model::{LoadOptions, load};
pub use models::{LayerHook, ModelSpec, Transformer};
