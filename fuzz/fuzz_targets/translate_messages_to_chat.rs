//! Fuzzes `providers::translate::messages_to_chat`: no panic on any request, response or
//! error body, and `StreamTranslator` gives the same bytes, usage and counts for any split.
//!
//! Input: the first byte picks a split point (scaled over the rest) and an error status,
//! the rest is the body or stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spidergate::providers::sse::{SseEvent, SseFramer};
use spidergate::providers::translate::messages_to_chat::{
    error_json, request, response_json, StreamTranslator,
};

/// Feeds `chunks`, then finishes; returns the output and the translator.
fn run(chunks: &[&[u8]]) -> (Vec<u8>, StreamTranslator) {
    let mut t = StreamTranslator::new();
    let mut out = Vec::new();
    for chunk in chunks {
        t.feed(chunk, &mut out);
    }
    t.finish(&mut out);
    (out, t)
}

fn summary(t: &StreamTranslator) -> (Option<spidergate::usage::Usage>, u64) {
    (t.usage(), t.content_bytes())
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };

    if let Ok(out) = request(body, "gpt-4o-mini", u64::MAX) {
        assert!(looks_like_object(&out), "request gave invalid JSON");
    }
    if let Some(out) = response_json(body) {
        assert!(looks_like_object(&out), "response gave invalid JSON");
    }
    let status = 400 + u16::from(first) % 200;
    assert!(
        looks_like_object(&error_json(status, body)),
        "error gave invalid JSON"
    );

    let cut = body.len() * usize::from(first) / 255;
    let (a, b) = body.split_at(cut);
    let (whole_out, whole) = run(&[body]);
    let (split_out, split) = run(&[a, b]);
    assert_eq!(whole_out, split_out, "split changed the output");
    assert_eq!(summary(&whole), summary(&split), "split changed the counts");
    check_events(&whole_out);

    // Tiny chunks once in a while (it is slow on big inputs).
    if body.len() <= 512 {
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let (one_out, one) = run(&bytes);
        assert_eq!(whole_out, one_out);
        assert_eq!(summary(&whole), summary(&one));
    }
});

/// The shape of every body the translator writes: a JSON object (the fuzz crate has no
/// JSON parser of its own; the unit tests parse them).
fn looks_like_object(bytes: &[u8]) -> bool {
    bytes.first() == Some(&b'{') && bytes.last() == Some(&b'}')
}

/// Every event written is named and carries an object.
fn check_events(sse: &[u8]) {
    let mut framer = SseFramer::new();
    let mut check = |e: SseEvent<'_>| {
        assert!(!e.event.is_empty(), "unnamed event");
        assert!(looks_like_object(e.data), "event data is not an object");
    };
    framer.feed(sse, &mut check);
    framer.finish(&mut check);
}
