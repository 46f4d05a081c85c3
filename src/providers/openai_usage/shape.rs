//! The shape of the last event read: a stream's events are nearly all alike.
//!
//! A chat stream sends one event per token or few, and they differ only in one string's
//! bytes: `data: {"id":"…","object":"chat.completion.chunk",…,"delta":{"content":"` + the
//! text + `"},"finish_reason":null}]}` and the blank line. Reading each one in full (the
//! line search, the key search over the whole event) cost about 1.2k instructions an event;
//! when an event's bytes are the last event's with only that value changed, its reading is
//! the last one's with that value's length changed, and checking this costs two compares
//! and a walk over the value.
//!
//! Why the reading is the same. [`super::keys`] reads an event by where its three keys
//! (`content"`, `"arguments"`, `"usage"`) occur. The bytes before the value (the head,
//! ending with the value's opening quote) and after it (the tail, from its closing quote to
//! the end of the blank line) are the last event's, so every occurrence inside them, and what
//! is read after each, are the same. The value holds no raw quote but escaped ones, so an
//! occurrence that touches it must start at its opening quote or at an escaped one and end
//! at its closing quote (all three keys have their quotes only at their ends):
//! - `content"` ending there is inside the value its key opened, which the search skips;
//! - `"usage"` or `"arguments"` ending there would be read only if a colon followed the
//!   closing quote, and a shape is learned only when none does;
//! - and such a match, ending at the closing quote, would hide one of the same key starting
//!   at it (matches of one key do not overlap), so a shape is not learned where the tail
//!   starts with `"usage"` or `"arguments"`.
//!
//! So only the counted length changes. The value may hold no raw line end (the line would
//! end there). Nothing is learned from an event that could be a usage event.

use super::MAX_EVENT_BYTES;

/// One event's bytes around its counted value, and the text bytes of its other values.
#[derive(Default)]
pub(super) struct EventShape {
    /// The head then the tail.
    bytes: Vec<u8>,
    /// 0 when nothing is learned.
    head_len: usize,
    /// Text bytes counted in the head and the tail.
    other_text: u64,
}

impl EventShape {
    /// Learns an event: `head` ends with its value's opening quote, `tail` starts with its
    /// closing quote and ends with the blank line. The caller has checked that no colon
    /// follows the closing quote and that the event is not a usage event.
    pub(super) fn learn(&mut self, head: &[u8], tail: &[u8], other_text: u64) {
        self.bytes.clear();
        // One allocation for the stream's first shape; later shapes mostly fit in it.
        self.bytes.reserve(head.len() + tail.len());
        self.bytes.extend_from_slice(head);
        self.bytes.extend_from_slice(tail);
        self.head_len = head.len();
        self.other_text = other_text;
    }

    /// The run of whole events of this shape that starts at `chunk[at..]`, one after
    /// another: where the last one ends in `chunk`, the text bytes they hold, and how many
    /// there are (at least one, else `None`). Read in one call, the events of a chunk cost
    /// their compares and not a call, the set-up and the caller's bookkeeping each.
    pub(super) fn read_run(&self, chunk: &[u8], mut at: usize) -> Option<(usize, u64, usize)> {
        if self.head_len == 0 {
            return None;
        }
        let (head, tail) = self.bytes.split_at(self.head_len);
        let (mut text, mut events) = (0u64, 0usize);
        while let Some((end, value_len)) = read_one(head, tail, chunk, at) {
            at = end;
            text += self.other_text + value_len;
            events += 1;
        }
        (events > 0).then_some((at, text, events))
    }
}

/// If `chunk[at..]` starts with a whole event made of `head`, a value and `tail`: where it
/// ends in `chunk` and the value's length.
#[inline(always)]
fn read_one(head: &[u8], tail: &[u8], chunk: &[u8], at: usize) -> Option<(usize, u64)> {
    let rest = chunk.get(at..)?;
    if !rest.starts_with(head) {
        return None;
    }
    // The value, eight bytes a step to its next quote, backslash or control byte.
    let mut i = head.len();
    loop {
        i = crate::providers::json_scan::plain_run(rest, i);
        match *rest.get(i)? {
            b'"' => break,
            b'\\' => match *rest.get(i + 1)? {
                b'\n' | b'\r' => return None,
                _ => i += 2,
            },
            b'\n' | b'\r' => return None,
            // Another control byte: part of the value, as any byte but these.
            _ => i += 1,
        }
    }
    let end = i + tail.len();
    if end > MAX_EVENT_BYTES || !rest[i..].starts_with(tail) {
        return None;
    }
    Some((at + end, (i - head.len()) as u64))
}
