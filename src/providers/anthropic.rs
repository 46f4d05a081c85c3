//! Anthropic Messages wire format: usage (whole JSON bodies and SSE streams) and the error
//! shape the Anthropic SDKs read.
//!
//! Anthropic reports `input_tokens` without the cached ones: a cache read is
//! `cache_read_input_tokens` and a cache write `cache_creation_input_tokens`, each on top.
//! [`AnthropicUsage::normalize`] folds them into the gateway's [`Usage`], where
//! `prompt_tokens` counts every input token once and the cache fields say which of them were
//! cache reads and writes.
//!
//! In a stream, `message_start` carries the input side and `message_delta` the cumulative
//! output (and, on newer API versions, cumulative input fields too). Each field keeps its
//! latest value; nothing is summed across events, so no token is counted twice.

use serde::Deserialize;

use crate::error::GateError;
use crate::usage::Usage;

use super::sse::{SseEvent, SseFramer, SseObserver};

/// `usage` as Anthropic spells it. Every field is optional: a `message_delta` may carry
/// only `output_tokens`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct AnthropicUsage {
    #[serde(default)]
    pub input_tokens: Option<u64>,
    #[serde(default)]
    pub output_tokens: Option<u64>,
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Later fields win; a field the update does not carry keeps its value.
    pub fn update(&mut self, later: &AnthropicUsage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_read_input_tokens = later
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
        self.cache_creation_input_tokens = later
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
    }

    /// The gateway's normal form; `None` when no count was reported at all (the caller
    /// then estimates instead of charging zero).
    pub fn normalize(&self) -> Option<Usage> {
        if self.input_tokens.is_none()
            && self.output_tokens.is_none()
            && self.cache_read_input_tokens.is_none()
            && self.cache_creation_input_tokens.is_none()
        {
            return None;
        }
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let write = self.cache_creation_input_tokens.unwrap_or(0);
        Some(Usage {
            prompt_tokens: self
                .input_tokens
                .unwrap_or(0)
                .saturating_add(read)
                .saturating_add(write),
            completion_tokens: self.output_tokens.unwrap_or(0),
            cache_read_tokens: read,
            cache_write_tokens: write,
            units: 0,
        })
    }

    /// From the gateway's normal form back to Anthropic's (for translated responses).
    pub fn from_usage(u: &Usage) -> AnthropicUsage {
        AnthropicUsage {
            input_tokens: Some(u.uncached_prompt_tokens()),
            output_tokens: Some(u.completion_tokens),
            cache_read_input_tokens: Some(u.cache_read_tokens),
            cache_creation_input_tokens: Some(u.cache_write_tokens),
        }
    }
}

#[derive(Deserialize)]
struct MessageBody {
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

/// Usage from a complete Messages response body.
pub fn usage_from_json(body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<MessageBody>(body)
        .ok()?
        .usage?
        .normalize()
}

/// One stream event, as far as usage and the output estimate need it.
#[derive(Deserialize)]
struct StreamEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    message: Option<MessageBody>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    content_block: Option<StartBlock<'a>>,
}

/// A `content_block_start`'s block: what it already carries of the output (a tool's name,
/// a redacted thinking block's data, any opening text).
#[derive(Deserialize)]
struct StartBlock<'a> {
    #[serde(default, borrow)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    thinking: Option<std::borrow::Cow<'a, str>>,
}

impl StartBlock<'_> {
    /// Bytes of output the block opens with: a stream cut right after a tool's name, or a
    /// redacted thinking block, is billed for it (SPEC §2: an estimate is never below).
    fn output_bytes(&self) -> u64 {
        [&self.name, &self.data, &self.text, &self.thinking]
            .iter()
            .filter_map(|s| s.as_ref().map(|s| s.len() as u64))
            .sum()
    }
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    partial_json: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    thinking: Option<std::borrow::Cow<'a, str>>,
}

/// Watches an Anthropic SSE stream pass through unchanged: usage from `message_start` and
/// `message_delta`, and the bytes of generated text (for an estimate when the stream breaks
/// before its usage arrived).
#[derive(Default)]
pub struct SseUsage {
    framer: SseFramer,
    usage: AnthropicUsage,
    content_bytes: u64,
    stopped: bool,
    /// A `message_delta` carried usage: the output count is final. Until then the only usage
    /// is `message_start`'s, whose `output_tokens` (1) counts nothing generated yet.
    final_usage: bool,
}

impl SseUsage {
    pub fn new() -> SseUsage {
        SseUsage::default()
    }

    fn on_event(&mut self, e: SseEvent<'_>) {
        if let Some(ev) = parse_event(e.data) {
            self.observe(&ev);
        }
    }

    fn observe(&mut self, ev: &StreamEvent<'_>) {
        match ev.kind.as_ref() {
            "message_start" => {
                if let Some(u) = ev.message.as_ref().and_then(|m| m.usage.as_ref()) {
                    self.usage.update(u);
                }
            }
            "message_delta" => {
                if let Some(u) = &ev.usage {
                    self.usage.update(u);
                    self.final_usage = true;
                }
            }
            "content_block_start" => {
                if let Some(b) = &ev.content_block {
                    self.content_bytes = self.content_bytes.saturating_add(b.output_bytes());
                }
            }
            "content_block_delta" => {
                if let Some(d) = &ev.delta {
                    let len = [&d.text, &d.partial_json, &d.thinking]
                        .iter()
                        .filter_map(|s| s.as_ref().map(|s| s.len() as u64))
                        .sum::<u64>();
                    self.content_bytes = self.content_bytes.saturating_add(len);
                }
            }
            "message_stop" => self.stopped = true,
            _ => {}
        }
    }

    /// The usage once final (a `message_delta` reported it); None before.
    pub fn usage(&self) -> Option<Usage> {
        self.usage.normalize().filter(|_| self.final_usage)
    }

    /// What was reported so far, final or not: a stream cut after `message_start` knows its
    /// input side from it.
    pub fn partial_usage(&self) -> Option<Usage> {
        self.usage.normalize()
    }

    pub fn content_bytes(&self) -> u64 {
        self.content_bytes
    }

    /// Whether `message_stop` was seen.
    pub fn done(&self) -> bool {
        self.stopped
    }
}

/// Only events that can matter are parsed: pings and block stops are skipped by a byte
/// check first.
fn parse_event(data: &[u8]) -> Option<StreamEvent<'_>> {
    let interesting = [
        &b"message_start"[..],
        b"message_delta",
        b"content_block_delta",
        b"content_block_start",
    ];
    if !interesting
        .iter()
        .any(|k| memchr::memmem::find(data, k).is_some())
    {
        if memchr::memmem::find(data, b"message_stop").is_some() {
            return serde_json::from_slice(data).ok();
        }
        return None;
    }
    serde_json::from_slice(data).ok()
}

/// Anthropic's `error.type` for a status (SPEC §3).
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// A gateway error in Anthropic's shape: `{"type":"error","error":{"type","message"}}`,
/// so the Anthropic SDKs raise their matching exception classes.
pub fn error_body(err: &GateError) -> Vec<u8> {
    error_body_with(err.status(), &err.to_string())
}

/// Anthropic's error shape for a status and message.
pub fn error_body_with(status: u16, message: &str) -> Vec<u8> {
    serde_json::json!({
        "type": "error",
        "error": { "type": error_type(status), "message": message },
    })
    .to_string()
    .into_bytes()
}

impl SseObserver for SseUsage {
    fn framer(&mut self) -> &mut SseFramer {
        &mut self.framer
    }

    fn event(&mut self, e: SseEvent<'_>) {
        self.on_event(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The stream of Anthropic's streaming documentation, with cache fields.
    const STREAM: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":2000,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

    fn observe(chunks: &[&[u8]]) -> (Option<Usage>, u64, bool) {
        let mut p = SseUsage::new();
        for c in chunks {
            p.feed(c);
        }
        p.finish();
        (p.usage(), p.content_bytes(), p.done())
    }

    #[test]
    fn stream_usage_counts_every_input_token_once_and_the_last_output() {
        let (usage, text, done) = observe(&[STREAM.as_bytes()]);
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 2125,
                completion_tokens: 15,
                cache_read_tokens: 2000,
                cache_write_tokens: 100,
                units: 0,
            })
        );
        assert_eq!((text, done), (6, true));
    }

    /// A stream cut after a block's start has output the provider bills in that start: a
    /// tool's name, a redacted thinking block's data (SPEC §2: never below the bill).
    #[test]
    fn a_block_start_counts_the_output_it_carries() {
        let start = STREAM.split("event: content_block_start").next().unwrap();
        let tool = format!(
            "{start}event: content_block_start\ndata: {}\n\n",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_current_weather_in_a_city","input":{}}}"#
        );
        let (usage, text, done) = observe(&[tool.as_bytes()]);
        assert_eq!((usage, text, done), (None, 29, false));
        let redacted = format!(
            "{start}event: content_block_start\ndata: {}\n\n",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"redacted_thinking","data":"EmwKAhgBEgy3va3pzix"}}"#
        );
        assert_eq!(observe(&[redacted.as_bytes()]).1, 19);
    }

    #[test]
    fn cumulative_input_in_message_delta_replaces_never_adds() {
        let stream = STREAM.replace(
            "\"usage\":{\"output_tokens\":15}",
            "\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":2000,\"output_tokens\":15}",
        );
        assert_eq!(observe(&[stream.as_bytes()]).0.unwrap().prompt_tokens, 2125);
    }

    #[test]
    fn json_usage_and_its_absence() {
        let body = br#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Hi"}],"model":"claude","stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":3}}"#;
        assert_eq!(
            usage_from_json(body),
            Some(Usage {
                prompt_tokens: 15,
                completion_tokens: 3,
                cache_read_tokens: 5,
                cache_write_tokens: 0,
                units: 0,
            })
        );
        assert_eq!(usage_from_json(br#"{"type":"message"}"#), None);
        assert_eq!(usage_from_json(br#"{"usage":{}}"#), None);
        assert_eq!(usage_from_json(b"nope"), None);
    }

    #[test]
    fn a_stream_cut_before_message_delta_keeps_the_input_side() {
        let cut = STREAM.find("event: message_delta").unwrap();
        let mut p = SseUsage::new();
        p.feed(&STREAM.as_bytes()[..cut]);
        p.finish();
        assert_eq!(
            p.usage(),
            None,
            "message_start's output_tokens is not a final count"
        );
        assert_eq!(p.partial_usage().unwrap().prompt_tokens, 2125);
        assert_eq!((p.content_bytes(), p.done()), (6, false));
    }

    #[test]
    fn errors_use_anthropic_types() {
        let v: serde_json::Value =
            serde_json::from_slice(&error_body(&GateError::InvalidApiKey)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "authentication_error");
        for (status, kind) in [
            (400, "invalid_request_error"),
            (402, "billing_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (429, "rate_limit_error"),
            (502, "api_error"),
            (504, "api_error"),
        ] {
            assert_eq!(error_type(status), kind);
        }
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_usage(cuts in proptest::collection::vec(0usize..1200, 0..6)) {
            let bytes = STREAM.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                chunks.push(&bytes[prev..c]);
                prev = c;
            }
            prop_assert_eq!(observe(&chunks), observe(&[bytes]));
        }
    }
}
