//! The gateway's one normal form of token usage, whatever wire format reported it. The
//! parsers that fill it live beside their codecs in `providers/`.

/// Tokens reported by (or estimated for) one upstream response, in one normal form for
/// every wire format: `prompt_tokens` counts every input token once, and the cache fields
/// say how many of those were cache reads or cache writes (priced apart when configured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// All input tokens, cached ones included: OpenAI's `prompt_tokens` / `input_tokens`;
    /// Anthropic's `input_tokens + cache_read_input_tokens + cache_creation_input_tokens`.
    pub prompt_tokens: u64,
    /// Output tokens (`completion_tokens` / `output_tokens`), 0 for embeddings.
    pub completion_tokens: u64,
    /// Of `prompt_tokens`, read from the provider's prompt cache (OpenAI
    /// `prompt_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`).
    pub cache_read_tokens: u64,
    /// Of `prompt_tokens`, written to the cache (Anthropic `cache_creation_input_tokens`).
    pub cache_write_tokens: u64,
    /// Units a multi-modal model charges by (`UnitPrice`): images returned, input
    /// characters, milliseconds of audio. 0 for token-priced answers.
    pub units: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            ..Usage::default()
        }
    }

    /// Input tokens that are neither cache reads nor cache writes.
    pub fn uncached_prompt_tokens(&self) -> u64 {
        self.prompt_tokens
            .saturating_sub(self.cache_read_tokens)
            .saturating_sub(self.cache_write_tokens)
    }
}
