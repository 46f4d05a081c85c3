//! Golden files under `tests/golden/messages_to_chat/`, built from the providers' documented
//! examples: `request_*` (Messages in, chat out, or `{"refused": "<message>"}`),
//! `response_*` (chat completion in, Message out) and `stream_*` (chat SSE in, Messages SSE
//! out), compared as parsed JSON, SSE event by event. `SPIDERGATE_BLESS_GOLDEN=1` rewrites the outputs (then
//! read every changed file before committing it).

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::error::GateError;
use crate::providers::sse::{SseEvent, SseFramer};

const UPSTREAM: &str = "gpt-4o-mini";

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/messages_to_chat")
}

/// `(name, input, expected output path)` for every `<prefix>*<in_ext>` file, sorted.
fn cases(prefix: &str, in_ext: &str, out_ext: &str) -> Vec<(String, Vec<u8>, PathBuf)> {
    let mut cases: Vec<_> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix) && n.ends_with(in_ext))
        .map(|n| {
            let stem = n.strip_suffix(in_ext).unwrap().to_owned();
            let input = std::fs::read(golden_dir().join(&n)).unwrap();
            let out = golden_dir().join(format!("{stem}{out_ext}"));
            (stem, input, out)
        })
        .collect();
    cases.sort_by(|a, b| a.0.cmp(&b.0));
    cases
}

fn bless() -> bool {
    super::super::bless_golden()
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap() + "\n"
}

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// Compares (or, blessing, writes) one JSON golden.
fn check_json(name: &str, got: Value, path: &Path) {
    if bless() {
        std::fs::write(path, pretty(&got)).unwrap();
        return;
    }
    let want = parse(&std::fs::read(path).unwrap_or_else(|_| panic!("{name}: no {path:?}")));
    assert_eq!(got, want, "{name}:\n{}", pretty(&got));
}

fn translate_request(body: &[u8]) -> Value {
    match request(body, UPSTREAM, u64::MAX) {
        Ok(out) => parse(&out),
        Err(GateError::InvalidRequest(m)) => json!({ "refused": m }),
        Err(e) => panic!("not a 400: {e:?}"),
    }
}

#[test]
fn request_goldens() {
    let cases = cases("request_", ".in.json", ".out.json");
    assert!(cases.len() >= 20, "golden files missing");
    for (name, input, out) in cases {
        let got = translate_request(&input);
        assert_eq!(
            name.starts_with("request_refuse_"),
            got.get("refused").is_some(),
            "{name}: {got}"
        );
        check_json(&name, got, &out);
    }
}

#[test]
fn response_goldens() {
    let cases = cases("response_", ".in.json", ".out.json");
    assert!(cases.len() >= 6, "golden files missing");
    for (name, input, out) in cases {
        let got = response_json(&input).unwrap_or_else(|| panic!("{name}: not translated"));
        check_json(&name, parse(&got), &out);
    }
}

/// A whole stream translated in `chunks`, plus the translator for its counters.
fn translate_stream(chunks: &[&[u8]]) -> (Vec<u8>, StreamTranslator) {
    let mut t = StreamTranslator::new();
    let mut out = Vec::new();
    for c in chunks {
        t.feed(c, &mut out);
    }
    t.finish(&mut out);
    (out, t)
}

/// `(event name, parsed data)` for each event; also checks every name matches its `type`.
fn events(sse: &[u8]) -> Vec<(String, Value)> {
    let mut framer = SseFramer::new();
    let mut events = Vec::new();
    let mut push = |e: SseEvent<'_>| {
        let name = String::from_utf8(e.event.to_vec()).unwrap();
        let data = parse(e.data);
        assert_eq!(data["type"], name.as_str(), "event name and type differ");
        events.push((name, data));
    };
    framer.feed(sse, &mut push);
    framer.finish(&mut push);
    events
}

#[test]
fn stream_goldens() {
    let cases = cases("stream_", ".in.sse", ".out.sse");
    assert!(cases.len() >= 6, "golden files missing");
    for (name, input, out) in cases {
        let (got, _) = translate_stream(&[&input]);
        if bless() {
            std::fs::write(&out, &got).unwrap();
            continue;
        }
        let want = std::fs::read(&out).unwrap_or_else(|_| panic!("{name}: no {out:?}"));
        assert_eq!(
            events(&got),
            events(&want),
            "{name}:\n{}",
            String::from_utf8_lossy(&got)
        );
    }
}

fn golden(name: &str) -> Vec<u8> {
    std::fs::read(golden_dir().join(name)).unwrap()
}

#[test]
fn stream_counts_usage_and_generated_bytes() {
    let (_, t) = translate_stream(&[&golden("stream_text_cached_usage.in.sse")]);
    assert_eq!(
        t.usage(),
        Some(Usage {
            prompt_tokens: 1200,
            completion_tokens: 5,
            cache_read_tokens: 1024,
            cache_write_tokens: 0,
            units: 0,
        })
    );
    assert_eq!(t.content_bytes(), "Hello! \"Hi\" é\n".len() as u64);

    let (_, t) = translate_stream(&[&golden("stream_parallel_tool_calls_interleaved.in.sse")]);
    let args = r#"{"tz":"Europe/Paris"}{"city":"Paris"}{"city":"Rome"}"#;
    // The tools' names are output too (billed), counted as they arrive.
    let names = "get_weather".len() + "get_time".len() + "get_weather".len();
    assert_eq!(
        t.content_bytes(),
        ("Checking both.".len() + args.len() + names) as u64
    );

    let (_, t) = translate_stream(&[&golden("stream_cut_without_done.in.sse")]);
    assert_eq!((t.usage(), t.content_bytes()), (None, 14));
}

#[test]
fn a_stream_held_for_usage_waits_for_it() {
    let input = golden("stream_tool_call.in.sse");
    let text = String::from_utf8(input).unwrap();
    let usage_at = text.find("data: {\"id\":\"chatcmpl-tool\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[]").unwrap();
    let mut t = StreamTranslator::new();
    let mut out = Vec::new();
    t.feed(&text.as_bytes()[..usage_at], &mut out);
    let names: Vec<_> = events(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.last().map(String::as_str), Some("content_block_stop"));
    t.feed(&text.as_bytes()[usage_at..], &mut out);
    let names: Vec<_> = events(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    let len = out.len();
    t.finish(&mut out);
    assert_eq!(out.len(), len, "nothing more after message_stop");
}

#[test]
fn calls_that_share_an_index_but_not_an_id_are_separate_blocks() {
    let chunk = |call: &str| {
        format!(
            "data: {{\"id\":\"c\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{call}]}}}}]}}\n\n"
        )
    };
    let input = [
        chunk(r#"{"index":0,"id":"call_1","function":{"name":"a","arguments":"{}"}}"#),
        chunk(r#"{"index":0,"id":"call_2","function":{"name":"b","arguments":"{\"x\":1}"}}"#),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    let (out, _) = translate_stream(&[input.as_bytes()]);
    let starts: Vec<_> = events(&out)
        .into_iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| (d["index"].clone(), d["content_block"]["id"].clone()))
        .collect();
    assert_eq!(
        starts,
        [(json!(0), json!("call_1")), (json!(1), json!("call_2"))]
    );
}

/// A stream that ended before its first chunk: the client, which has its 200 head, gets
/// Anthropic's error event (its SDK raises on it), not a body that ends with nothing. One
/// that said `[DONE]` at once answered nothing, and gets nothing.
#[test]
fn an_upstream_stream_cut_before_its_first_chunk_gets_an_error_event() {
    let (out, _) = translate_stream(&[b""]);
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("event: error\n"), "{text}");
    assert_eq!(text.matches("event: ").count(), 1, "{text}");
    assert!(text.contains(r#""type":"api_error""#), "{text}");
    assert!(translate_stream(&[b"data: [DONE]\n\n"]).0.is_empty());
}

#[test]
fn errors_take_anthropic_shape_and_type() {
    let body = br#"{"error":{"message":"Incorrect API key provided: sk-***.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    assert_eq!(
        parse(&error_json(401, body)),
        json!({"type":"error","error":{"type":"authentication_error","message":"Incorrect API key provided: sk-***."}})
    );
    let body = br#"{"error":{"message":"Rate limit reached for gpt-4o-mini","type":"requests","code":"rate_limit_exceeded"}}"#;
    assert_eq!(
        parse(&error_json(429, body))["error"],
        json!({"type":"rate_limit_error","message":"Rate limit reached for gpt-4o-mini"})
    );
    assert_eq!(
        parse(&error_json(400, br#"{"error":"model is required"}"#))["error"],
        json!({"type":"invalid_request_error","message":"model is required"})
    );
    assert_eq!(
        parse(&error_json(502, b"<html>Bad Gateway</html>"))["error"],
        json!({"type":"api_error","message":"the upstream model answered with HTTP status 502"})
    );
    assert_eq!(
        parse(&error_json(404, br#"{"detail":"Not Found"}"#))["error"]["type"],
        "not_found_error"
    );
}

#[test]
fn not_a_chat_completion_is_not_translated() {
    assert_eq!(response_json(b"not json"), None);
    assert_eq!(response_json(br#"{"object":"list","data":[]}"#), None);
}

/// What Claude Code sends (2.1.x, `claude -p` against a custom base URL): adaptive thinking,
/// `output_config.effort`, `context_management` and a mid-conversation `system` message.
/// An OpenAI-compatible model takes it: the system text where it stands, the rest dropped.
#[test]
fn claude_codes_request_is_translated() {
    let got = translate_request(
        br#"{"model":"m","max_tokens":32000,"stream":true,
             "thinking":{"type":"adaptive"},"output_config":{"effort":"high"},
             "context_management":{"edits":[{"type":"clear_thinking_20251015","keep":"all"}]},
             "system":[{"type":"text","text":"You are Claude Code."}],
             "messages":[{"role":"user","content":[{"type":"text","text":"say hi"}]},
                         {"role":"system","content":"Today is Monday."}]}"#,
    );
    assert_eq!(
        got["messages"],
        json!([
            {"role": "system", "content": "You are Claude Code."},
            {"role": "user", "content": "say hi"},
            {"role": "system", "content": "Today is Monday."},
        ]),
        "{}",
        pretty(&got)
    );
    for dropped in [
        "thinking",
        "output_config",
        "context_management",
        "reasoning_effort",
    ] {
        assert!(got.get(dropped).is_none(), "{dropped}: {}", pretty(&got));
    }
    // Still refused: thinking it asks for, and an output format.
    for refused in [
        br#"{"max_tokens":1,"thinking":{"type":"enabled","budget_tokens":1024},"messages":[{"role":"user","content":"x"}]}"#.as_slice(),
        br#"{"max_tokens":1,"output_config":{"format":{"type":"json_schema"}},"messages":[{"role":"user","content":"x"}]}"#,
        br#"{"max_tokens":1,"messages":[{"role":"user","content":"x"},{"role":"system","content":[{"type":"image"}]}]}"#,
    ] {
        let got = translate_request(refused);
        assert!(got.get("refused").is_some(), "{}", pretty(&got));
    }
}

#[test]
fn refusals_are_400_invalid_request() {
    let err = request(
        br#"{"max_tokens":1,"top_k":1,"messages":[]}"#,
        UPSTREAM,
        u64::MAX,
    )
    .unwrap_err();
    assert_eq!((err.status(), err.code()), (400, "invalid_request"));
}

/// Splits `bytes` at the sorted `cuts`.
fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut prev = 0;
    for c in cuts.into_iter().chain([bytes.len()]) {
        chunks.push(&bytes[prev..c]);
        prev = c;
    }
    chunks
}

#[test]
fn byte_by_byte_gives_the_same_output() {
    for (name, input, _) in cases("stream_", ".in.sse", ".out.sse") {
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        let (whole, w) = translate_stream(&[&input]);
        let (one, o) = translate_stream(&bytes);
        assert_eq!(whole, one, "{name}");
        assert_eq!(
            (w.usage(), w.content_bytes()),
            (o.usage(), o.content_bytes())
        );
    }
}

proptest! {
    #[test]
    fn any_split_gives_the_same_output(
        which in 0usize..64,
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let cases = cases("stream_", ".in.sse", ".out.sse");
        let input = &cases[which % cases.len()].1;
        let (whole, w) = translate_stream(&[input]);
        let (parts, p) = translate_stream(&split(input, &cuts));
        prop_assert_eq!(whole, parts);
        prop_assert_eq!((w.usage(), w.content_bytes()), (p.usage(), p.content_bytes()));
    }
}
