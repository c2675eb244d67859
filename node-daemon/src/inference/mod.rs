//! Inference on the served model (feature `torch`): the manager that brings a model up
//! ([`manager`]), the model cache behind `/api/v1/models/*` ([`model_cache`]), the inference
//! port's OpenAI API ([`openai`]) and PoC v2 on that model ([`pow_v2`]), all over
//! `gonka-inference`'s engine.

pub mod manager;
pub mod model_cache;
pub mod openai;
pub mod pow_v2;
