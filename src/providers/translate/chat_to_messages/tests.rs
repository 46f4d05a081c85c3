//! Golden files under `tests/golden/chat_to_messages/` (inputs from the providers' documented
//! examples, compared as parsed JSON), refusals, and split invariance of the stream.
//!
//! `SPIDERGATE_BLESS_GOLDEN=1 cargo nextest run --lib translate::chat_to_messages` rewrites the
//! expected files from the current output; review the diff before committing it.

use proptest::prelude::*;
use serde_json::Value;

use super::*;
use crate::error::GateError;
use crate::usage::Usage;

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/chat_to_messages/"
);
const UPSTREAM: &str = "claude-sonnet-4-5";
const DEFAULT_MAX_TOKENS: u64 = 4096;

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{DIR}{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

/// `created` is the clock's; everything else must match.
fn without_created(mut v: Value) -> Value {
    if let Some(c) = v.get_mut("created") {
        *c = 0.into();
    }
    v
}

fn bless() -> bool {
    super::super::bless_golden()
}

/// Compares `actual` with `<name>.out.json` as JSON.
fn check_json(name: &str, actual: Value) {
    let path = format!("{name}.out.json");
    if bless() {
        let mut text = serde_json::to_string_pretty(&actual).unwrap();
        text.push('\n');
        std::fs::write(format!("{DIR}{path}"), text).unwrap();
    }
    assert_eq!(actual, json(&read(&path)), "{path}");
}

#[test]
fn golden_requests() {
    for name in [
        "request_system_multiturn",
        "request_images",
        "request_tools",
        "request_tool_choice_required",
        "request_tool_choice_none",
    ] {
        let out = request(
            &read(&format!("{name}.in.json")),
            UPSTREAM,
            DEFAULT_MAX_TOKENS,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        check_json(name, json(&out));
    }
}

#[test]
fn golden_refusals_name_the_field() {
    let cases = json(&read("request_refusals.json"));
    for case in cases.as_array().unwrap() {
        let body = serde_json::to_vec(&case["body"]).unwrap();
        let mentions = case["mentions"].as_str().unwrap();
        match request(&body, UPSTREAM, DEFAULT_MAX_TOKENS) {
            Err(e @ GateError::InvalidRequest(_)) => {
                assert_eq!(e.status(), 400);
                let msg = e.to_string();
                assert!(msg.contains(mentions), "{msg:?} should name {mentions}");
            }
            other => panic!("{} should be refused, got {other:?}", case["body"]),
        }
    }
}

#[test]
fn temperature_at_the_edges_of_anthropics_range_passes() {
    for t in ["0", "1", "1.0"] {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"temperature":{t}}}"#
        );
        let out = json(&request(body.as_bytes(), UPSTREAM, 10).unwrap());
        assert_eq!(out["temperature"], json(t.as_bytes()));
        assert_eq!(out["max_tokens"], 10);
    }
}

#[test]
fn golden_responses() {
    for name in [
        "response_text",
        "response_tool_use",
        "response_thinking_max_tokens",
        "response_refusal",
    ] {
        let out = response_json(&read(&format!("{name}.in.json")))
            .unwrap_or_else(|| panic!("{name}: not translated"));
        let v = json(&out);
        assert!(v["created"].as_i64().unwrap() > 1_600_000_000);
        check_json(name, without_created(v));
    }
}

#[test]
fn stop_reasons_map_to_finish_reasons() {
    for (stop, finish) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ] {
        let body = format!(
            r#"{{"type":"message","id":"m","model":"c","content":[],"stop_reason":"{stop}"}}"#
        );
        let v = json(&response_json(body.as_bytes()).unwrap());
        assert_eq!(v["choices"][0]["finish_reason"], finish, "{stop}");
        assert!(v["choices"][0]["message"]["content"].is_null());
        assert!(v.get("usage").is_none());
    }
}

#[test]
fn a_body_that_is_not_a_message_is_not_translated() {
    for body in [
        &b"not json"[..],
        br#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
        br#"[]"#,
    ] {
        assert_eq!(response_json(body), None);
    }
}

#[test]
fn golden_errors() {
    for (name, status) in [
        ("error_overloaded", 529),
        ("error_invalid_request", 400),
        ("error_rate_limit", 429),
    ] {
        let out = error_json(status, &read(&format!("{name}.in.json")));
        check_json(name, json(&out));
    }
}

#[test]
fn a_body_that_is_not_an_anthropic_error_gets_a_generic_message() {
    for (status, kind, code) in [
        (502, "api_error", "api_error"),
        (401, "authentication_error", "authentication_error"),
        (429, "requests", "rate_limit_error"),
    ] {
        let v = json(&error_json(status, b"<html>Bad Gateway</html>"));
        assert_eq!(v["error"]["type"], kind);
        assert_eq!(v["error"]["code"], code);
        assert!(v["error"]["param"].is_null());
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(&status.to_string()), "{msg}");
    }
}

/// (input file stem, include_usage): stems ending in `_usage` ask for the usage chunk.
const STREAMS: [&str; 6] = [
    "stream_text_usage",
    "stream_tool_use",
    "stream_thinking_max_tokens_usage",
    "stream_error",
    "stream_stop_sequence_no_message_stop_usage",
    "stream_truncated",
];

fn translate(name: &str, chunks: &[&[u8]]) -> (Vec<u8>, StreamTranslator) {
    let mut t = StreamTranslator::with_created(name.ends_with("_usage"), 1_700_000_000);
    let mut out = Vec::new();
    for c in chunks {
        t.feed(c, &mut out);
    }
    t.finish(&mut out);
    (out, t)
}

/// Each `data:` event of an SSE body: `[DONE]` as a string, else parsed JSON without
/// `created`. Every event must be exactly `data: ...\n\n`.
fn events(sse: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(sse).unwrap();
    assert!(text.is_empty() || text.ends_with("\n\n"), "{text}");
    text.split_terminator("\n\n")
        .map(|e| {
            let data = e.strip_prefix("data: ").unwrap_or_else(|| panic!("{e:?}"));
            assert!(!data.contains('\n'), "{data}");
            match data {
                "[DONE]" => Value::String(data.into()),
                _ => without_created(json(data.as_bytes())),
            }
        })
        .collect()
}

#[test]
fn golden_streams() {
    for name in STREAMS {
        let input = read(&format!("{name}.in.sse"));
        let (out, _) = translate(name, &[&input]);
        let path = format!("{name}.out.sse");
        if bless() {
            std::fs::write(format!("{DIR}{path}"), &out).unwrap();
        }
        let (got, want) = (events(&out), events(&read(&path)));
        assert_eq!(got.len(), want.len(), "{path}: event count");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{path}: event {i}");
        }
    }
}

#[test]
fn stream_usage_is_normalized_and_text_is_counted() {
    let (_, t) = translate("stream_text_usage", &[&read("stream_text_usage.in.sse")]);
    assert_eq!(
        t.usage(),
        Some(Usage {
            prompt_tokens: 2125,
            completion_tokens: 15,
            cache_read_tokens: 2000,
            cache_write_tokens: 100,
            units: 0,
        })
    );
    assert_eq!(
        t.content_bytes(),
        "Hello".len() as u64 + "! \"Café\" \n".len() as u64
    );

    // Cumulative input in message_delta replaces, never adds.
    let (_, t) = translate(
        "stream_thinking_max_tokens_usage",
        &[&read("stream_thinking_max_tokens_usage.in.sse")],
    );
    assert_eq!(t.usage(), Some(Usage::new(40, 64)));

    // A broken stream keeps what it saw, for the estimate; message_start's output count is
    // not a final one.
    let (_, t) = translate("stream_truncated", &[&read("stream_truncated.in.sse")]);
    assert_eq!(t.usage(), None);
    assert_eq!(t.partial_usage(), Some(Usage::new(8, 1)));
    assert_eq!(t.content_bytes(), 7);
}

/// A stream cut right after a tool's name, or after a redacted thinking block (no OpenAI
/// form): both are output the provider bills, counted for the estimate.
#[test]
fn a_cut_stream_counts_a_tools_name_and_redacted_thinking() {
    let start = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\",\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
    );
    let tool = format!(
        "{start}event: content_block_start\ndata: {}\n\n",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_current_weather_in_a_city","input":{}}}"#
    );
    let (_, t) = translate("cut_tool", &[tool.as_bytes()]);
    assert_eq!((t.usage(), t.content_bytes()), (None, 29));
    let redacted = format!(
        "{start}event: content_block_start\ndata: {}\n\n",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"redacted_thinking","data":"EmwKAhgBEgy3va3pzix"}}"#
    );
    let (_, t) = translate("cut_redacted", &[redacted.as_bytes()]);
    assert_eq!(t.content_bytes(), 19);
}

#[test]
fn an_empty_stream_ends_in_an_error_not_done() {
    let (out, t) = translate("empty", &[]);
    let ev = events(&out);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["error"]["code"], "api_error");
    assert_eq!(t.usage(), None);
}

proptest! {
    #[test]
    fn any_split_gives_the_same_bytes(
        which in 0..STREAMS.len(),
        cuts in proptest::collection::vec(0usize..4000, 0..8),
    ) {
        let name = STREAMS[which];
        let input = read(&format!("{name}.in.sse"));
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut prev = 0;
        for c in cuts.into_iter().chain([input.len()]) {
            chunks.push(&input[prev..c]);
            prev = c;
        }
        let (whole, a) = translate(name, &[&input]);
        let (split, b) = translate(name, &chunks);
        prop_assert_eq!(whole, split);
        prop_assert_eq!(a.usage(), b.usage());
        prop_assert_eq!(a.content_bytes(), b.content_bytes());
    }
}

#[test]
fn byte_by_byte_gives_the_same_bytes() {
    for name in STREAMS {
        let input = read(&format!("{name}.in.sse"));
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(
            translate(name, &[&input]).0,
            translate(name, &bytes).0,
            "{name}"
        );
    }
}

proptest! {
    /// The fuzz target's properties, on a budget: no panic on any bytes, and a damaged
    /// recorded stream still translates the same for any split.
    #[test]
    fn damaged_input_never_panics_and_splits_alike(
        which in 0..STREAMS.len(),
        damage in proptest::collection::vec((0usize..4000, any::<u8>()), 0..6),
        cut in 0usize..4000,
    ) {
        let name = STREAMS[which];
        let mut input = read(&format!("{name}.in.sse"));
        for (at, byte) in damage {
            let at = at % input.len();
            input[at] = byte;
        }
        let _ = request(&input, UPSTREAM, 1);
        let _ = response_json(&input);
        let _ = error_json(500, &input);
        let cut = cut.min(input.len());
        let (a, b) = input.split_at(cut);
        prop_assert_eq!(translate(name, &[&input]).0, translate(name, &[a, b]).0);
    }

    #[test]
    fn any_json_ish_body_never_panics(body in "[\\[\\]{}\":,a-z0-9 .-]{0,200}") {
        let _ = request(body.as_bytes(), UPSTREAM, 1);
        let _ = response_json(body.as_bytes());
        let _ = error_json(400, body.as_bytes());
    }
}
