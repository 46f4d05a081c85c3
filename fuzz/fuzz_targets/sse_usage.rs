//! Fuzzes `providers::openai_usage::SseUsageParser` split invariance and `usage_from_json`.
//!
//! Input: the first byte picks a split point (scaled over the rest), the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spidergate::providers::openai_usage::{usage_from_json, Forward, SseUsageParser};

/// Feeds `chunks` and returns the concatenated forwarded bytes and the parser.
fn run(strip: bool, chunks: &[&[u8]]) -> (Vec<u8>, SseUsageParser) {
    let mut parser = SseUsageParser::new(strip);
    let mut out = Vec::new();
    for chunk in chunks {
        let fwd = parser.feed(chunk);
        match &fwd {
            Forward::Unchanged | Forward::Nothing => {}
            Forward::Range(r) => assert!(!r.is_empty() && r.end <= chunk.len(), "bad range"),
            Forward::Without(hole) => assert!(
                hole.start > 0 && hole.start < hole.end && hole.end < chunk.len(),
                "a hole with an empty side"
            ),
            Forward::Owned(v) => assert!(!v.is_empty(), "empty Owned"),
        }
        if !strip {
            assert_eq!(fwd, Forward::Unchanged, "not stripping must forward unchanged");
        }
        out.extend_from_slice(&fwd.bytes(chunk));
    }
    out.extend_from_slice(&parser.finish().bytes(&[]));
    (out, parser)
}

fn summary(p: &SseUsageParser) -> (Option<spidergate::usage::Usage>, u64, bool) {
    (p.usage(), p.content_bytes(), p.done())
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let cut = stream.len() * usize::from(first) / 255;
    let (a, b) = stream.split_at(cut);

    for strip in [false, true] {
        let (whole_out, whole) = run(strip, &[stream]);
        let (split_out, split) = run(strip, &[a, b]);
        assert_eq!(summary(&whole), summary(&split), "split changed the result");
        assert_eq!(whole_out, split_out, "split changed the forwarded bytes");
        if !strip || !mentions_usage(stream) {
            assert_eq!(whole_out, stream, "nothing to strip, output must equal input");
        }
        assert!(whole_out.len() <= stream.len());
    }

    // Tiny chunks once in a while (it is slow on big inputs).
    if stream.len() <= 512 {
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let (one_out, one) = run(true, &bytes);
        let (whole_out, whole) = run(true, &[stream]);
        assert_eq!(summary(&whole), summary(&one));
        assert_eq!(whole_out, one_out);
    }

    let _ = usage_from_json(stream);
});

/// Only a stream that mentions `"usage"` can have an event stripped.
fn mentions_usage(stream: &[u8]) -> bool {
    stream.windows(7).any(|w| w == b"\"usage\"")
}
