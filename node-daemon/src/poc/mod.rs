//! Proof of compute, v1 ("PoW 2.0"): the pieces that must match upstream bit for bit.
//!
//! Today: [`rng`], numpy's random numbers. The random-initialised Llama on libtorch, the nonce
//! iterator, batching and validation build on it.

pub mod params;
pub mod pipeline;
pub mod rng;
mod ziggurat_tables;
