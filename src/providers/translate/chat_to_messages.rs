//! A client speaking OpenAI chat completions, served by an Anthropic model: the request goes
//! out as a Messages request, the answer comes back as a chat completion.

use crate::error::GateError;
use crate::usage::Usage;

/// OpenAI chat request body -> Anthropic Messages request body for `upstream_model`.
/// `default_max_tokens` fills Anthropic's required `max_tokens` when the client set neither
/// `max_tokens` nor `max_completion_tokens`.
pub fn request(
    _body: &[u8],
    _upstream_model: &str,
    _default_max_tokens: u64,
) -> Result<Vec<u8>, GateError> {
    Err(GateError::InvalidRequest("not implemented yet".into()))
}

/// A whole Anthropic Messages response -> an OpenAI `chat.completion`. None if the body is
/// not a Messages response.
pub fn response_json(_body: &[u8]) -> Option<Vec<u8>> {
    None
}

/// An Anthropic error body (any status) -> OpenAI's error shape.
pub fn error_json(_status: u16, body: &[u8]) -> Vec<u8> {
    body.to_vec()
}

/// Anthropic SSE -> OpenAI `chat.completion.chunk` SSE, chunk by chunk.
#[derive(Default)]
pub struct StreamTranslator {}

impl StreamTranslator {
    /// `include_usage`: the client asked for the usage chunk (`stream_options`).
    pub fn new(_include_usage: bool) -> StreamTranslator {
        StreamTranslator {}
    }

    /// Appends the translation of `chunk` to `out`.
    pub fn feed(&mut self, _chunk: &[u8], _out: &mut Vec<u8>) {}

    /// End of the upstream stream: appends whatever is still owed (`data: [DONE]`).
    pub fn finish(&mut self, _out: &mut Vec<u8>) {}

    pub fn usage(&self) -> Option<Usage> {
        None
    }

    pub fn content_bytes(&self) -> u64 {
        0
    }
}
