//! The proof model's shape: defined once, in the protocol crate, with the PoC wire shapes.

pub use gonka_protocol::pow::{Params, ParamsError};
