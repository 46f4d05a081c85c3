//! The `x-mock-*` request headers that steer a reply, and the token counts they produce.

use std::time::Duration;

use serde_json::value::RawValue;

use crate::billing::{hidden_input, Api, HiddenSizes};
use crate::numbers::parse_decimal;
use crate::Served;

const DEFAULT_PROMPT_TOKENS: u64 = 10;
const DEFAULT_COMPLETION_TOKENS: u64 = 5;
const DEFAULT_CHUNKS: u64 = 3;
/// `x-mock-completion-tokens: max` for a request that sets no output bound.
const MAX_MODE_DEFAULT_OUTPUT: u64 = 16;
/// `x-mock-completion-tokens: max` never reports more than this.
pub(crate) const MAX_MODE_CAP: u64 = 1_000_000_000;
/// Caps `x-mock-chunks` so a typo cannot stream forever.
const MAX_CHUNKS: u64 = 1_000_000;
/// The arguments of every `x-mock-tool-call` call.
pub(crate) const TOOL_ARGUMENTS: &str = r#"{"city":"Paris"}"#;

pub(crate) struct Knobs {
    prompt_tokens: u64,
    completion_tokens: u64,
    cache_read_tokens: u64,
    cache_write_tokens: u64,
    pub(crate) status: Option<u16>,
    pub(crate) delay_ms: u64,
    pub(crate) chunks: u64,
    pub(crate) chunk_delay_ms: u64,
    pub(crate) break_after: Option<u64>,
    pub(crate) no_usage: bool,
    /// `x-mock-image-usage: 1`: images answers report token usage.
    pub(crate) image_usage: bool,
    /// `x-mock-audio-usage: duration`: a streamed transcription reports seconds of audio
    /// instead of tokens, and a `json` one reports them too.
    pub(crate) audio_usage_duration: bool,
    /// `x-mock-audio-usage: tokens`: a `json` transcription reports token usage, as
    /// gpt-4o-transcribe does (a streamed one always does unless told `duration`).
    pub(crate) audio_usage_tokens: bool,
    /// `x-mock-status` applies only to requests for this model (fallback tests); quoted.
    pub(crate) status_model: Option<Vec<u8>>,
    /// `x-mock-prompt-tokens: bytes`: report the body length as prompt tokens.
    prompt_from_body: bool,
    /// `x-mock-completion-tokens: max`: report everything the request allows.
    completion_from_max: bool,
    /// `x-mock-drop: 1`: close without answering.
    pub(crate) drop: bool,
    /// `x-mock-empty-error: 1`: the `x-mock-status` reply has an empty body
    /// (`Content-Length: 0`), as some proxies and providers send.
    pub(crate) empty_error: bool,
    /// `x-mock-leak-headers: 1`: add provider-account headers to the response.
    pub(crate) leak_headers: bool,
    /// `x-mock-gzip: 1`: a JSON answer is gzip-compressed (`content-encoding: gzip`), though
    /// the gateway asked for `identity` (as a proxy in front of a provider may do).
    pub(crate) gzip: bool,
    /// `x-mock-gateway-headers: 1`: add headers named as the gateway's own.
    pub(crate) gateway_headers: bool,
    /// `x-mock-early-hints: 1`: a `103 Early Hints` head before the answer's.
    pub(crate) early_hints: bool,
    /// `x-mock-tool-call: NAME`: answer with a call of this tool.
    pub(crate) tool_call: Option<String>,
    /// What the provider adds beyond the body in `bytes` mode.
    hidden: HiddenSizes,
    /// `x-mock-context-window: W`: more input than this is refused with 400, as a real
    /// model refuses a prompt longer than its context window.
    pub(crate) context_window: Option<u64>,
    /// `x-mock-too-large: 1`: refuse the request as too large for the key's per-minute
    /// tokens while the key has capacity left.
    pub(crate) too_large: bool,
    /// `x-mock-hold: NAME`: hold stream content chunk 2 until the test opens gate NAME.
    pub(crate) hold: Option<String>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            prompt_tokens: DEFAULT_PROMPT_TOKENS,
            completion_tokens: DEFAULT_COMPLETION_TOKENS,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            status: None,
            delay_ms: 0,
            chunks: DEFAULT_CHUNKS,
            chunk_delay_ms: 0,
            break_after: None,
            no_usage: false,
            image_usage: false,
            audio_usage_duration: false,
            audio_usage_tokens: false,
            status_model: None,
            prompt_from_body: false,
            completion_from_max: false,
            drop: false,
            empty_error: false,
            leak_headers: false,
            gzip: false,
            gateway_headers: false,
            early_hints: false,
            tool_call: None,
            hidden: HiddenSizes::default(),
            context_window: None,
            too_large: false,
            hold: None,
        }
    }
}

/// Unparseable knob values are ignored, leaving the default. `knob` is the name after `x-mock-`.
pub(crate) fn apply_knob(knobs: &mut Knobs, knob: &str, value: &[u8]) {
    let number = parse_decimal(value).map(|n| n as u64);
    let knob = knob.as_bytes();
    if knob.eq_ignore_ascii_case(b"prompt-tokens") {
        knobs.prompt_from_body = value.eq_ignore_ascii_case(b"bytes");
        knobs.prompt_tokens = number.unwrap_or(knobs.prompt_tokens);
    } else if knob.eq_ignore_ascii_case(b"completion-tokens") {
        knobs.completion_from_max = value.eq_ignore_ascii_case(b"max");
        knobs.completion_tokens = number.unwrap_or(knobs.completion_tokens);
    } else if knob.eq_ignore_ascii_case(b"cache-read-tokens") {
        knobs.cache_read_tokens = number.unwrap_or(0);
    } else if knob.eq_ignore_ascii_case(b"cache-write-tokens") {
        knobs.cache_write_tokens = number.unwrap_or(0);
    } else if knob.eq_ignore_ascii_case(b"status") {
        knobs.status = number
            .filter(|s| (200..=599).contains(s))
            .and_then(|s| u16::try_from(s).ok());
    } else if knob.eq_ignore_ascii_case(b"delay-ms") {
        knobs.delay_ms = number.unwrap_or(0);
    } else if knob.eq_ignore_ascii_case(b"chunks") {
        knobs.chunks = number.unwrap_or(DEFAULT_CHUNKS).min(MAX_CHUNKS);
    } else if knob.eq_ignore_ascii_case(b"chunk-delay-ms") {
        knobs.chunk_delay_ms = number.unwrap_or(0);
    } else if knob.eq_ignore_ascii_case(b"break-after") {
        knobs.break_after = number;
    } else if knob.eq_ignore_ascii_case(b"status-model") {
        let mut quoted = Vec::with_capacity(value.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(value);
        quoted.push(b'"');
        knobs.status_model = Some(quoted);
    } else if knob.eq_ignore_ascii_case(b"no-usage") {
        knobs.no_usage = truthy(value);
    } else if knob.eq_ignore_ascii_case(b"image-usage") {
        knobs.image_usage = truthy(value);
    } else if knob.eq_ignore_ascii_case(b"audio-usage") {
        knobs.audio_usage_duration = value.eq_ignore_ascii_case(b"duration");
        knobs.audio_usage_tokens = value.eq_ignore_ascii_case(b"tokens");
    } else if knob.eq_ignore_ascii_case(b"drop") {
        knobs.drop = truthy(value);
    } else if knob.eq_ignore_ascii_case(b"empty-error") {
        knobs.empty_error = truthy(value);
    } else if knob.eq_ignore_ascii_case(b"leak-headers") {
        knobs.leak_headers = truthy(value);
    } else if knob.eq_ignore_ascii_case(b"gzip") {
        knobs.gzip = truthy(value);
    } else if knob.eq_ignore_ascii_case(b"gateway-headers") {
        knobs.gateway_headers = truthy(value);
    } else if knob.eq_ignore_ascii_case(b"early-hints") {
        knobs.early_hints = truthy(value);
    } else if knob.eq_ignore_ascii_case(b"stored-tokens") {
        knobs.hidden.stored = number.unwrap_or(knobs.hidden.stored);
    } else if knob.eq_ignore_ascii_case(b"server-tool-tokens") {
        knobs.hidden.server_tool = number.unwrap_or(knobs.hidden.server_tool);
    } else if knob.eq_ignore_ascii_case(b"file-tokens") {
        knobs.hidden.file = number.unwrap_or(knobs.hidden.file);
    } else if knob.eq_ignore_ascii_case(b"too-large") {
        knobs.too_large = truthy(value);
    } else if knob.eq_ignore_ascii_case(b"context-window") {
        knobs.context_window = number;
    } else if knob.eq_ignore_ascii_case(b"hold") {
        knobs.hold = std::str::from_utf8(value)
            .ok()
            .filter(|name| !name.is_empty())
            .map(str::to_owned);
    } else if knob.eq_ignore_ascii_case(b"tool-call") {
        knobs.tool_call = std::str::from_utf8(value)
            .ok()
            .filter(|name| !name.is_empty())
            .map(str::to_owned);
    }
}

fn truthy(value: &[u8]) -> bool {
    !(value.is_empty() || value == b"0" || value.eq_ignore_ascii_case(b"false"))
}

/// A token count from a JSON number of any shape: integers as they are (saturating at
/// `u64::MAX`), other finite non-negative numbers truncated; anything else is `None`.
fn lenient_count(raw: Option<&RawValue>) -> Option<u64> {
    let text = raw?.get();
    if let Ok(n) = text.parse::<u64>() {
        return Some(n);
    }
    match serde_json::from_str::<f64>(text) {
        // `as` saturates: 1e30 becomes u64::MAX.
        Ok(f) if f.is_finite() && f >= 0.0 => Some(f as u64),
        _ => None,
    }
}

/// The output-bounding fields of a request, kept raw so any JSON value parses. Responses'
/// `max_output_tokens` and Anthropic's `max_tokens` go in `max_tokens`.
#[derive(Default)]
pub(crate) struct OutputFields<'a> {
    pub(crate) max_tokens: Option<&'a RawValue>,
    pub(crate) max_completion_tokens: Option<&'a RawValue>,
    pub(crate) n: Option<&'a RawValue>,
}

/// The tokens one reply reports, before each wire format shapes them.
#[derive(Clone, Copy)]
pub(crate) struct Tokens {
    /// Input tokens neither read from nor written to a cache.
    pub(crate) fresh_input: u64,
    pub(crate) cache_read: u64,
    pub(crate) cache_write: u64,
    pub(crate) output: u64,
}

impl Tokens {
    /// Every input token: OpenAI's `prompt_tokens` / `input_tokens`.
    pub(crate) fn all_input(&self) -> u64 {
        self.fresh_input
            .saturating_add(self.cache_read)
            .saturating_add(self.cache_write)
    }

    /// What an OpenAI-shaped usage object reports: cache writes are plain prompt tokens.
    pub(crate) fn served_openai(&self) -> Served {
        Served {
            prompt: self.all_input(),
            completion: self.output,
            cache_read: self.cache_read,
            cache_write: 0,
        }
    }

    /// What an Anthropic usage object reports.
    pub(crate) fn served_anthropic(&self) -> Served {
        Served {
            cache_write: self.cache_write,
            ..self.served_openai()
        }
    }
}

impl Knobs {
    /// The tokens this request is billed, after the `bytes` / `max` modes. `output: None`
    /// (embeddings) leaves the completion count as the knob says.
    pub(crate) fn tokens(
        &self,
        body: &[u8],
        output: Option<&OutputFields<'_>>,
        api: Api,
    ) -> Tokens {
        let fresh_input = if self.prompt_from_body {
            (body.len() as u64).saturating_add(hidden_input(body, api, &self.hidden))
        } else {
            self.prompt_tokens
        };
        let output = match output {
            Some(o) if self.completion_from_max => {
                let per_choice = match (
                    lenient_count(o.max_tokens),
                    lenient_count(o.max_completion_tokens),
                ) {
                    (None, None) => MAX_MODE_DEFAULT_OUTPUT,
                    (a, b) => a.unwrap_or(0).max(b.unwrap_or(0)),
                };
                let n = lenient_count(o.n).unwrap_or(1);
                n.saturating_mul(per_choice).min(MAX_MODE_CAP)
            }
            _ => self.completion_tokens,
        };
        Tokens {
            fresh_input,
            cache_read: self.cache_read_tokens,
            cache_write: self.cache_write_tokens,
            output,
        }
    }

    /// Input past `x-mock-context-window`: the real API refuses it before any work.
    pub(crate) fn over_window(&self, tokens: &Tokens) -> bool {
        self.context_window.is_some_and(|w| tokens.all_input() > w)
    }

    /// Whether `x-mock-status` applies to this body (`x-mock-status-model` matches).
    pub(crate) fn status_for(&self, body: &[u8]) -> Option<u16> {
        let applies = self
            .status_model
            .as_deref()
            .is_none_or(|m| memchr::memmem::find(body, m).is_some());
        self.status.filter(|&s| s != 200 && applies)
    }

    /// Stream chunk `i` (0-based) may not be sent: `x-mock-break-after` cuts here.
    pub(crate) fn breaks_at(&self, i: u64) -> bool {
        self.break_after.is_some_and(|n| i >= n)
    }

    /// The pause before stream chunk `i` (none before the first).
    pub(crate) fn chunk_delay(&self, i: u64) -> Option<Duration> {
        (i > 0 && self.chunk_delay_ms > 0).then(|| Duration::from_millis(self.chunk_delay_ms))
    }

    /// [`TOOL_ARGUMENTS`] cut into `x-mock-chunks` pieces (at least one, at most one per byte).
    pub(crate) fn argument_pieces(&self) -> Vec<&'static str> {
        let len = TOOL_ARGUMENTS.len();
        let pieces = (self.chunks.max(1) as usize).min(len);
        (0..pieces)
            .map(|i| &TOOL_ARGUMENTS[i * len / pieces..(i + 1) * len / pieces])
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn argument_pieces_rebuild_the_arguments() {
        for chunks in [0, 1, 3, 7, 16, 1000] {
            let knobs = Knobs {
                chunks,
                ..Knobs::default()
            };
            let pieces = knobs.argument_pieces();
            assert_eq!(pieces.len(), (chunks.max(1) as usize).min(16));
            assert_eq!(pieces.concat(), TOOL_ARGUMENTS);
        }
    }

    #[test]
    fn cache_knobs_add_to_the_input() {
        let mut knobs = Knobs::default();
        apply_knob(&mut knobs, "cache-read-tokens", b"30");
        apply_knob(&mut knobs, "Cache-Write-Tokens", b"20");
        apply_knob(&mut knobs, "tool-call", b"get_weather");
        let t = knobs.tokens(b"{}", None, Api::OpenAi);
        assert_eq!((t.fresh_input, t.cache_read, t.cache_write), (10, 30, 20));
        assert_eq!(t.all_input(), 60);
        assert_eq!(t.served_openai().cache_write, 0);
        assert_eq!(t.served_anthropic().cache_write, 20);
        assert_eq!(knobs.tool_call.as_deref(), Some("get_weather"));
    }
}
