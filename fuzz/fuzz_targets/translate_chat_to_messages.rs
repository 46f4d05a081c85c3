//! Fuzzes `providers::translate::chat_to_messages`: no panic on any input for `request`,
//! `response_json` and `error_json`, and `StreamTranslator` split invariance.
//!
//! Input: the first byte picks a split point (scaled over the rest) and the error status;
//! the rest is the body or stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spidergate::providers::translate::chat_to_messages::{
    error_json, request, response_json, StreamTranslator,
};

/// Feeds `chunks`, returns the output with `created` blanked and the translator.
fn run(include_usage: bool, chunks: &[&[u8]]) -> (Vec<u8>, StreamTranslator) {
    let mut t = StreamTranslator::new(include_usage);
    let mut out = Vec::new();
    for chunk in chunks {
        t.feed(chunk, &mut out);
    }
    t.finish(&mut out);
    (without_created(&out), t)
}

/// Two translators made a second apart differ in `created` only; blank its digits. A quote
/// inside a JSON string is escaped, so `"created":` only matches the member itself.
fn without_created(out: &[u8]) -> Vec<u8> {
    const KEY: &[u8] = b"\"created\":";
    let mut v = Vec::with_capacity(out.len());
    let mut i = 0;
    while i < out.len() {
        if out[i..].starts_with(KEY) {
            v.extend_from_slice(KEY);
            i += KEY.len();
            while i < out.len() && out[i].is_ascii_digit() {
                i += 1;
            }
            v.push(b'0');
        } else {
            v.push(out[i]);
            i += 1;
        }
    }
    v
}

/// Every event is `data: ...\n\n`, and nothing follows `[DONE]` or an error.
fn well_formed(out: &[u8]) {
    let text = std::str::from_utf8(out).expect("output is UTF-8");
    assert!(
        text.is_empty() || text.ends_with("\n\n"),
        "unterminated event"
    );
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    for (i, e) in events.iter().enumerate() {
        let data = e
            .strip_prefix("data: ")
            .expect("every event is a data event");
        assert!(!data.contains('\n'), "one line per event");
        if data == "[DONE]" || data.starts_with("{\"error\"") {
            assert_eq!(i + 1, events.len(), "nothing after [DONE] or an error");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };

    let _ = request(rest, "claude-fuzz", 1024);
    let _ = response_json(rest);
    let _ = error_json(400 + u16::from(first), rest);

    let cut = rest.len() * usize::from(first) / 255;
    let (a, b) = rest.split_at(cut);
    let include_usage = first & 1 == 1;
    let (whole_out, whole) = run(include_usage, &[rest]);
    let (split_out, split) = run(include_usage, &[a, b]);
    assert_eq!(whole_out, split_out, "split changed the output");
    assert_eq!(whole.usage(), split.usage(), "split changed the usage");
    assert_eq!(whole.content_bytes(), split.content_bytes());
    well_formed(&whole_out);

    // Tiny chunks once in a while (it is slow on big inputs).
    if rest.len() <= 512 {
        let bytes: Vec<&[u8]> = rest.chunks(1).collect();
        let (one_out, one) = run(include_usage, &bytes);
        assert_eq!(whole_out, one_out, "byte-by-byte changed the output");
        assert_eq!(whole.usage(), one.usage());
    }
});
