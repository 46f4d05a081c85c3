//! Fuzzes the Anthropic and Responses usage observers and the SSE framer under them: any
//! split of a stream gives the same usage, text count and end-of-stream flag as the whole
//! stream, and a whole body never panics the JSON usage parsers.
//!
//! Input: the first byte picks a split point (scaled over the rest), the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spidergate::providers::sse::SseObserver;
use spidergate::providers::{anthropic, responses};
use spidergate::usage::Usage;

type Summary = (Option<Usage>, u64, bool);

fn anthropic_run(chunks: &[&[u8]]) -> Summary {
    let mut p = anthropic::SseUsage::new();
    for c in chunks {
        p.feed(c);
    }
    p.finish();
    (p.usage(), p.content_bytes(), p.done())
}

fn responses_run(chunks: &[&[u8]]) -> Summary {
    let mut p = responses::SseUsage::new();
    for c in chunks {
        p.feed(c);
    }
    p.finish();
    (p.usage(), p.content_bytes(), p.done())
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let cut = stream.len() * usize::from(first) / 255;
    let (a, b) = stream.split_at(cut);
    assert_eq!(anthropic_run(&[stream]), anthropic_run(&[a, b]));
    assert_eq!(responses_run(&[stream]), responses_run(&[a, b]));
    if stream.len() <= 512 {
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(anthropic_run(&[stream]), anthropic_run(&bytes));
        assert_eq!(responses_run(&[stream]), responses_run(&bytes));
    }
    if let Some(u) = anthropic::usage_from_json(stream) {
        assert!(u.cache_read_tokens + u.cache_write_tokens <= u.prompt_tokens);
    }
    if let Some(u) = spidergate::providers::openai_usage::usage_from_json(stream) {
        assert!(u.cache_read_tokens <= u.prompt_tokens);
    }
});
