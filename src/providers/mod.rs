//! Upstream wire formats, one module per provider kind.

pub mod openai;
