//! A client speaking Anthropic Messages, served by an OpenAI-kind model: the request goes
//! out as a chat completion, the answer comes back as a Messages response.
//!
//! Three rooms: [`request`] (`to_chat_request.rs`) maps every Messages field or refuses it
//! with 400 naming the field; [`response_json`] and [`error_json`] (`from_chat_response.rs`)
//! turn a whole answer around; [`StreamTranslator`] (`stream.rs`) does the same for a stream,
//! event by event. The field-by-field decisions are listed at the top of each file.
//!
//! What is lost on the way back, because OpenAI does not report it: which stop sequence
//! ended a turn (`stop` always becomes `end_turn`, `stop_sequence` is null) and cache
//! writes (`cache_creation_input_tokens` is always 0; OpenAI caches without a write fee).

mod from_chat_response;
mod stream;
mod to_chat_request;

#[cfg(test)]
mod tests;

pub use from_chat_response::{error_json, response_json};
pub use stream::StreamTranslator;
pub use to_chat_request::request;

use crate::providers::anthropic::AnthropicUsage;
use crate::usage::Usage;

/// OpenAI's `finish_reason` -> Anthropic's `stop_reason`. An unknown or missing reason is a
/// turn that ended on its own.
fn stop_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic's `usage` object for the gateway's normal form: `input_tokens` without the
/// cache reads, which go to `cache_read_input_tokens`.
#[derive(serde::Serialize)]
struct UsageOut {
    input_tokens: u64,
    output_tokens: u64,
    cache_read_input_tokens: u64,
    cache_creation_input_tokens: u64,
}

impl UsageOut {
    fn from_usage(u: &Usage) -> UsageOut {
        let a = AnthropicUsage::from_usage(u);
        UsageOut {
            input_tokens: a.input_tokens.unwrap_or(0),
            output_tokens: a.output_tokens.unwrap_or(0),
            cache_read_input_tokens: a.cache_read_input_tokens.unwrap_or(0),
            cache_creation_input_tokens: a.cache_creation_input_tokens.unwrap_or(0),
        }
    }
}
