//! Server-sent events framing, shared by the codecs that read a stream event by event (the
//! Anthropic and Responses usage observers, the stream translators). Fed chunk by chunk from a
//! synchronous hook, it never blocks, reuses its buffers, and yields the same events for any
//! split of the input.
//!
//! Framing follows the WHATWG spec: LF, CRLF or CR line ends; `:` comments; `event:` and
//! `data:` fields (several `data:` lines are joined with `\n`); a blank line dispatches. An
//! event with no data is not dispatched. An event over [`MAX_EVENT_BYTES`] is skipped whole,
//! so a hostile upstream cannot make the gateway buffer without bound.

use crate::providers::openai_usage::MAX_EVENT_BYTES;

/// One dispatched event: its `event:` name (empty when absent) and its joined data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    pub event: &'a [u8],
    pub data: &'a [u8],
}

#[derive(Debug, Default)]
pub struct SseFramer {
    /// Start of a line carried over from earlier chunks; capped at `MAX_EVENT_BYTES + 1`.
    line: Vec<u8>,
    /// The previous chunk ended in CR, so a leading LF in this chunk belongs to it.
    after_cr: bool,
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    overflow: bool,
}

impl SseFramer {
    pub fn new() -> SseFramer {
        SseFramer::default()
    }

    /// Feeds one chunk; `on_event` is called for every event it completes.
    pub fn feed(&mut self, chunk: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        let mut pos = 0;
        if std::mem::take(&mut self.after_cr) && chunk.first() == Some(&b'\n') {
            pos = 1;
        }
        while let Some(i) = memchr::memchr2(b'\n', b'\r', &chunk[pos..]) {
            let eol = pos + i;
            let mut next = eol + 1;
            if chunk[eol] == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            if self.line.is_empty() {
                self.line_done(&chunk[pos..eol], on_event);
            } else {
                push_capped(&mut self.line, &chunk[pos..eol]);
                let line = std::mem::take(&mut self.line);
                self.line_done(&line, on_event);
                self.line = line;
                self.line.clear();
            }
            pos = next;
        }
        if pos < chunk.len() {
            push_capped(&mut self.line, &chunk[pos..]);
        }
    }

    /// End of stream: an unterminated last line and event are dispatched as if terminated.
    pub fn finish(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, on_event);
            self.line = line;
            self.line.clear();
        }
        self.after_cr = false;
        self.dispatch(on_event);
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent<'_>)) {
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line.len() > MAX_EVENT_BYTES {
            self.overflow = true;
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(0) => return, // a comment
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        if self.overflow {
            return;
        }
        match field {
            b"data" => {
                let sep = usize::from(self.has_data);
                if self.data.len() + sep + value.len() > MAX_EVENT_BYTES {
                    self.overflow = true;
                    return;
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if self.has_data && !self.overflow {
            on_event(SseEvent {
                event: &self.event,
                data: &self.data,
            });
        }
        self.event.clear();
        self.data.clear();
        self.has_data = false;
        self.overflow = false;
    }
}

/// A reader of an SSE stream that passes through unchanged (usage observers): it owns a
/// framer and handles each event; `feed` and `finish` are the same for all of them.
pub trait SseObserver {
    fn framer(&mut self) -> &mut SseFramer;

    fn event(&mut self, e: SseEvent<'_>);

    fn feed(&mut self, chunk: &[u8]) {
        // The framer is moved out for the call, so events can borrow `self` mutably.
        let mut framer = std::mem::take(self.framer());
        framer.feed(chunk, &mut |e| self.event(e));
        *self.framer() = framer;
    }

    /// End of stream: an unterminated last event is handled as if terminated.
    fn finish(&mut self) {
        let mut framer = std::mem::take(self.framer());
        framer.finish(&mut |e| self.event(e));
        *self.framer() = framer;
    }
}

/// Appends to a carried-over line, keeping at most `MAX_EVENT_BYTES + 1` bytes so that
/// "longer than the cap" is decided the same way however the line was split.
fn push_capped(line: &mut Vec<u8>, bytes: &[u8]) {
    let room = (MAX_EVENT_BYTES + 1).saturating_sub(line.len());
    line.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn events(chunks: &[&[u8]]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut framer = SseFramer::new();
        let mut out = Vec::new();
        let mut push = |e: SseEvent<'_>| out.push((e.event.to_vec(), e.data.to_vec()));
        for c in chunks {
            framer.feed(c, &mut push);
        }
        framer.finish(&mut push);
        out
    }

    #[test]
    fn names_data_comments_and_line_ends() {
        let got = events(&[
            b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: ping\n\ndata: x\ndata: y\r\revent:e\ndata:z",
        ]);
        assert_eq!(
            got,
            vec![
                (b"message_start".to_vec(), b"{\"a\":1}".to_vec()),
                (vec![], b"x\ny".to_vec()),
                (b"e".to_vec(), b"z".to_vec()),
            ]
        );
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_and_names_do_not_leak() {
        let got = events(&[b"event: ping\n\ndata: 1\n\n"]);
        assert_eq!(got, vec![(vec![], b"1".to_vec())]);
    }

    #[test]
    fn an_overlong_event_is_skipped_whole() {
        let big = vec![b'a'; MAX_EVENT_BYTES + 1];
        let mut input = b"data: ".to_vec();
        input.extend_from_slice(&big);
        input.extend_from_slice(b"\n\ndata: after\n\n");
        assert_eq!(events(&[&input]), vec![(vec![], b"after".to_vec())]);
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_events(
            input in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), Just(b':'), Just(b' '), Just(b'd'),
                            Just(b'a'), Just(b't'), Just(b'e'), Just(b'v'), Just(b'n'), any::<u8>()],
                0..200),
            cut in 0usize..200,
        ) {
            let cut = cut.min(input.len());
            let (a, b) = input.split_at(cut);
            prop_assert_eq!(events(&[&input]), events(&[a, b]));
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            prop_assert_eq!(events(&[&input]), events(&bytes));
        }
    }
}
