//! OpenAI's transcriptions and translations: usage from a whole answer (`duration` of
//! `verbose_json`, or a `usage` object of type `tokens` or `duration`) and from a stream
//! (`stream=true`: `transcript.text.delta` events, then `transcript.text.done` carrying the
//! final `usage`). The stream passes through unchanged; deltas are measured, without a copy,
//! for the estimate of a stream cut before its usage.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::providers::openai_usage::usage_from_json;
use crate::usage::Usage;

use super::sse::{SseEvent, SseFramer, SseObserver};

/// The fields of an answer or a stream event that say how much audio was billed.
#[derive(Deserialize)]
struct Billed<'a> {
    /// `verbose_json`: seconds of audio.
    #[serde(default)]
    duration: Option<f64>,
    /// `{"type":"duration","seconds":N}` (duration-priced models); token counts are read
    /// by [`usage_from_json`].
    #[serde(default)]
    usage: Option<Seconds>,
    /// Stream events: `transcript.text.delta`, `transcript.text.done`, ...
    #[serde(default, rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    /// A delta's text, kept raw: its escaped length is at least its text's.
    #[serde(default, borrow)]
    delta: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Seconds {
    #[serde(default)]
    seconds: Option<f64>,
}

/// Milliseconds of `seconds`, rounded up; None for anything not a finite non-negative number.
fn ms(seconds: Option<f64>) -> Option<u64> {
    seconds
        .filter(|d| d.is_finite() && *d >= 0.0)
        .map(|d| (d * 1000.0).ceil() as u64)
}

/// The usage of a whole answer or a `transcript.text.done` event: `units` = the longer of
/// the reported `duration` and `usage.seconds`, in ms (rounded up), with token usage where
/// reported. None for a body with neither (text, srt, vtt; a done event without usage).
pub fn usage(body: &[u8]) -> Option<Usage> {
    let billed: Billed<'_> = serde_json::from_slice(body).ok()?;
    usage_of(&billed, body)
}

fn usage_of(billed: &Billed<'_>, body: &[u8]) -> Option<Usage> {
    let tokens = usage_from_json(body);
    let duration = ms(billed.duration);
    let seconds = ms(billed.usage.as_ref().and_then(|u| u.seconds));
    let units = match (duration, seconds) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0))),
    };
    if units.is_none() && tokens.is_none() {
        return None;
    }
    let mut usage = tokens.unwrap_or_default();
    usage.units = units.unwrap_or(0);
    Some(usage)
}

/// A streamed transcription, observed as it passes: the final usage from
/// `transcript.text.done`, and the bytes of text delivered before it.
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

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Bytes of transcript text delivered so far (escaped, so never fewer than the text's).
    pub fn content_bytes(&self) -> u64 {
        self.content_bytes
    }

    /// Whether `transcript.text.done` was seen.
    pub fn done(&self) -> bool {
        self.done
    }
}

impl SseObserver for SseUsage {
    fn framer(&mut self) -> &mut SseFramer {
        &mut self.framer
    }

    fn event(&mut self, e: SseEvent<'_>) {
        let Ok(billed) = serde_json::from_slice::<Billed<'_>>(e.data) else {
            return;
        };
        let kind = billed.kind.map_or(&b""[..], |k| k.get().as_bytes());
        let named = |name: &[u8]| {
            e.event == name || kind.get(1..kind.len().saturating_sub(1)) == Some(name)
        };
        if named(b"transcript.text.delta") {
            // The raw string with its quotes: two more than its escaped text.
            let raw = billed.delta.map_or(0, |d| d.get().len().saturating_sub(2));
            self.content_bytes = self.content_bytes.saturating_add(raw as u64);
        } else if named(b"transcript.text.done") {
            self.done = true;
            if let Some(u) = usage_of(&billed, e.data) {
                self.usage = Some(u);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Shaped after OpenAI's streaming transcription reference (gpt-4o-transcribe).
    const STREAM: &str = concat!(
        "data: {\"type\":\"transcript.text.delta\",\"delta\":\"I see skies\"}\n\n",
        "data: {\"type\":\"transcript.text.delta\",\"delta\":\" of blue \\u00e9\\n\"}\n\n",
        "data: {\"type\":\"transcript.text.done\",\"text\":\"I see skies of blue \\u00e9\\n\",",
        "\"usage\":{\"type\":\"tokens\",\"input_tokens\":14,\"input_token_details\":",
        "{\"text_tokens\":0,\"audio_tokens\":14},\"output_tokens\":45,\"total_tokens\":59}}\n\n",
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
    fn the_done_event_carries_the_token_usage() {
        let (usage, text, done) = observe(&[STREAM.as_bytes()]);
        assert_eq!(usage, Some(Usage::new(14, 45)));
        // "I see skies" (11) + the escaped " of blue \u00e9\n" (17): never below the text.
        assert_eq!((text, done), (28, true));
    }

    #[test]
    fn a_duration_usage_is_in_ms_and_named_events_count_too() {
        let stream = concat!(
            "event: transcript.text.delta\ndata: {\"delta\":\"hi\"}\n\n",
            "event: transcript.text.done\ndata: {\"text\":\"hi\",\"usage\":{\"type\":\"duration\",\"seconds\":3.2}}\n\n",
        );
        let (usage, text, done) = observe(&[stream.as_bytes()]);
        let want = Usage {
            units: 3_200,
            ..Usage::default()
        };
        assert_eq!((usage, text, done), (Some(want), 2, true));
    }

    #[test]
    fn a_stream_cut_before_done_has_its_text_but_no_usage() {
        let cut = STREAM
            .find("data: {\"type\":\"transcript.text.done")
            .unwrap();
        assert_eq!(observe(&[&STREAM.as_bytes()[..cut]]), (None, 28, false));
    }

    #[test]
    fn whole_answers_report_duration_seconds_or_tokens() {
        let verbose = br#"{"task":"transcribe","duration":12.5,"text":"x","usage":{"type":"duration","seconds":13}}"#;
        assert_eq!(usage(verbose).map(|u| u.units), Some(13_000));
        assert_eq!(
            usage(br#"{"text":"x","duration":1.0001}"#).map(|u| u.units),
            Some(1_001)
        );
        let tokens = br#"{"text":"x","usage":{"type":"tokens","input_tokens":7,"output_tokens":2,"total_tokens":9}}"#;
        assert_eq!(usage(tokens), Some(Usage::new(7, 2)));
        assert_eq!(usage(br#"{"text":"x"}"#), None);
        assert_eq!(usage(b"plain text"), None);
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_usage(cuts in proptest::collection::vec(0usize..400, 0..6)) {
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
