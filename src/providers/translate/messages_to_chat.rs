//! A client speaking Anthropic Messages, served by an OpenAI-kind model: the request goes
//! out as a chat completion, the answer comes back as a Messages response.

use crate::error::GateError;
use crate::usage::Usage;

/// Anthropic Messages request body -> OpenAI chat request body for `upstream_model`. A
/// stream asks for `stream_options.include_usage`, so usage always arrives.
pub fn request(_body: &[u8], _upstream_model: &str) -> Result<Vec<u8>, GateError> {
    Err(GateError::InvalidRequest("not implemented yet".into()))
}

/// A whole OpenAI `chat.completion` -> an Anthropic Messages response. None if the body is
/// not a chat completion.
pub fn response_json(_body: &[u8]) -> Option<Vec<u8>> {
    None
}

/// An OpenAI error body (any status) -> Anthropic's error shape.
pub fn error_json(_status: u16, body: &[u8]) -> Vec<u8> {
    body.to_vec()
}

/// OpenAI chat SSE -> Anthropic Messages SSE, chunk by chunk.
#[derive(Default)]
pub struct StreamTranslator {}

impl StreamTranslator {
    pub fn new() -> StreamTranslator {
        StreamTranslator {}
    }

    /// Appends the translation of `chunk` to `out`.
    pub fn feed(&mut self, _chunk: &[u8], _out: &mut Vec<u8>) {}

    /// End of the upstream stream: appends whatever is still owed (`message_stop`).
    pub fn finish(&mut self, _out: &mut Vec<u8>) {}

    pub fn usage(&self) -> Option<Usage> {
        None
    }

    pub fn content_bytes(&self) -> u64 {
        0
    }
}
