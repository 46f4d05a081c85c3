//! OpenAI's Responses API: usage from a whole response body (`usage.input_tokens`,
//! `usage.output_tokens`, `usage.input_tokens_details.cached_tokens`) and from a stream,
//! where the terminal event (`response.completed`, or `response.incomplete` /
//! `response.failed`) carries the whole response with its usage. The stream is passed
//! through unchanged; only terminal events are parsed, delta events are measured for the
//! output estimate of a stream that breaks first.

use serde::Deserialize;

use crate::providers::openai_usage::usage_from_json;
use crate::usage::Usage;

use super::sse::{SseEvent, SseFramer, SseObserver};

#[derive(Deserialize)]
struct Terminal<'a> {
    #[serde(borrow)]
    response: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
struct DeltaEvent<'a> {
    #[serde(default, borrow)]
    delta: Option<std::borrow::Cow<'a, str>>,
}

const TERMINAL: [&[u8]; 3] = [
    b"\"response.completed\"",
    b"\"response.incomplete\"",
    b"\"response.failed\"",
];

#[derive(Default)]
pub struct SseUsage {
    framer: SseFramer,
    usage: Option<Usage>,
    content_bytes: u64,
    done: bool,
}

impl SseUsage {
    pub fn new() -> SseUsage {
        SseUsage::default()
    }

    fn on_event(&mut self, e: SseEvent<'_>) {
        let name_or_data = if e.event.is_empty() { e.data } else { e.event };
        if e.event.ends_with(b".delta") || (e.event.is_empty() && has(e.data, b".delta\"")) {
            if let Ok(d) = serde_json::from_slice::<DeltaEvent<'_>>(e.data) {
                let len = d.delta.map_or(0, |s| s.len() as u64);
                self.content_bytes = self.content_bytes.saturating_add(len);
            }
            return;
        }
        let terminal = TERMINAL
            .iter()
            .any(|t| has(name_or_data, &t[1..t.len() - 1]));
        if !terminal {
            return;
        }
        let Ok(t) = serde_json::from_slice::<Terminal<'_>>(e.data) else {
            return;
        };
        if let Some(u) = t.response.and_then(|r| usage_from_json(r.get().as_bytes())) {
            self.usage = Some(u);
        }
        self.done = true;
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    pub fn content_bytes(&self) -> u64 {
        self.content_bytes
    }

    /// Whether a terminal event was seen.
    pub fn done(&self) -> bool {
        self.done
    }
}

fn has(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
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

    /// Shaped after the streaming example of OpenAI's Responses API reference.
    const STREAM: &str = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_67c9\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-4.1\",\"output\":[],\"usage\":null}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":5,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\" there\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"resp_67c9\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-4.1\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi there\"}]}],\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":12},\"output_tokens\":11,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":48}}}\n\n",
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
    fn usage_comes_from_the_completed_event_with_cached_tokens() {
        let (usage, text, done) = observe(&[STREAM.as_bytes()]);
        let want = Usage {
            prompt_tokens: 37,
            completion_tokens: 11,
            cache_read_tokens: 12,
            cache_write_tokens: 0,
            units: 0,
        };
        assert_eq!((usage, text, done), (Some(want), 8, true));
    }

    #[test]
    fn a_stream_cut_before_completion_has_no_usage_but_its_text() {
        let cut = STREAM.find("event: response.completed").unwrap();
        assert_eq!(observe(&[&STREAM.as_bytes()[..cut]]), (None, 8, false));
    }

    #[test]
    fn whole_bodies_read_input_and_output_tokens() {
        let body = br#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":2},"output_tokens":7,"total_tokens":12},"user":null}"#;
        let u = usage_from_json(body).unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cache_read_tokens),
            (5, 7, 2)
        );
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
