//! Provider wire formats. Nothing outside this module knows one: each format's request
//! fields, usage parsing, error shape and translation live here, beside each other.

pub mod anthropic;
pub mod openai;
pub mod responses;
pub mod sse;
pub mod translate;
