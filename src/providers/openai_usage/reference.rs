//! The stream parser as it was before it read events in place (eb501a8), kept to
//! hold the new one to the same reading: the property tests feed both the same chunks and
//! compare usage, text bytes, `[DONE]` and the forwarded bytes.

use std::ops::Range;

use super::{flat, keys, push_capped, serde_chunk, MAX_EVENT_BYTES};
use crate::usage::Usage;

pub struct OldParser {
    strip: bool,
    usage: Option<Usage>,
    content_bytes: u64,
    done: bool,

    /// Start of a line carried over from earlier chunks; capped at `MAX_EVENT_BYTES + 1`.
    line: Vec<u8>,
    /// The previous chunk ended in CR, so a leading LF in this chunk belongs to it.
    after_cr: bool,

    /// Data fields of the current event, joined with `\n`.
    data: Vec<u8>,
    has_data: bool,
    event_overflow: bool,

    /// Stripping only: bytes of the current block from earlier chunks, not yet forwarded.
    held: Vec<u8>,
    /// Stripping only: length of the current block so far, including bytes in `held`.
    block_len: usize,
    /// Stripping only: the current block grew too long to hold; it is forwarded as it comes.
    block_committed: bool,
    /// Stripping only: the previous chunk ended with the CR of a blank line; `Some(true)` if
    /// that block was dropped (so a leading LF is dropped too).
    cr_ended_block: Option<bool>,
}

impl OldParser {
    /// `strip_usage_event`: when true, the usage-only event (a data event whose JSON has a
    /// non-null `usage` object and `"choices": []`) is removed from the bytes passed on to the
    /// client, because the gateway asked the upstream for usage on the client's behalf
    /// (`stream_options.include_usage`) and the client did not ask for it.
    #[must_use]
    pub fn new(strip_usage_event: bool) -> Self {
        OldParser {
            strip: strip_usage_event,
            usage: None,
            content_bytes: 0,
            done: false,
            line: Vec::new(),
            after_cr: false,
            data: Vec::new(),
            has_data: false,
            event_overflow: false,
            held: Vec::new(),
            block_len: 0,
            block_committed: false,
            cr_ended_block: None,
        }
    }

    /// Feed one chunk. Returns the bytes to forward to the client for this chunk.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if chunk.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut pos = 0;
        // In-chunk start of the current block's bytes (stripping only).
        let mut block_start = 0;
        let cr_ended_block = self.cr_ended_block.take();
        if std::mem::take(&mut self.after_cr) && chunk[0] == b'\n' {
            pos = 1;
            if let Some(dropped) = cr_ended_block {
                if !dropped {
                    out.push(b'\n');
                }
                block_start = 1;
            }
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
            let ended = if self.line.is_empty() {
                self.process_line(&chunk[pos..eol])
            } else {
                push_capped(&mut self.line, &chunk[pos..eol]);
                let line = std::mem::take(&mut self.line);
                let ended = self.process_line(&line);
                self.line = line;
                self.line.clear();
                ended
            };
            if let Some(is_usage_event) = ended {
                if self.strip {
                    let dropped =
                        self.end_block(chunk, block_start..next, is_usage_event, &mut out);
                    if self.after_cr {
                        self.cr_ended_block = Some(dropped);
                    }
                }
                block_start = next;
            }
            pos = next;
        }
        if pos < chunk.len() {
            push_capped(&mut self.line, &chunk[pos..]);
        }
        if !self.strip {
            return chunk.to_vec();
        }
        if block_start < chunk.len() {
            self.block_len = self.block_len.saturating_add(chunk.len() - block_start);
            if !self.block_committed && self.block_len > MAX_EVENT_BYTES {
                self.block_committed = true;
                out.append(&mut self.held);
            }
            if self.block_committed {
                out.extend_from_slice(&chunk[block_start..]);
            } else {
                self.held.extend_from_slice(&chunk[block_start..]);
            }
        }
        out
    }

    /// Call at end of stream: returns any held-back bytes that must still be forwarded
    /// (e.g. an incomplete final event that is not a usage event). An unterminated final
    /// line and event are analysed as if they had been terminated.
    pub fn finish(&mut self) -> Vec<u8> {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            // A line cannot end a block here: it is non-empty.
            self.process_line(&line);
            self.line = line;
            self.line.clear();
        }
        self.after_cr = false;
        self.cr_ended_block = None;
        let is_usage_event = self.dispatch();
        let held = std::mem::take(&mut self.held);
        let dropped = is_usage_event && !self.block_committed && self.block_len <= MAX_EVENT_BYTES;
        self.block_len = 0;
        self.block_committed = false;
        if !self.strip || dropped || held.is_empty() {
            self.held = held;
            self.held.clear();
            Vec::new()
        } else {
            held
        }
    }

    /// Last usage seen in any event (OpenAI puts it in the final chunk; some providers put a
    /// `usage` on a content chunk: any non-null usage object counts, the last one wins).
    #[must_use]
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Raw JSON-string bytes of generated text seen so far: `content` and
    /// `reasoning_content` values and tool-call `arguments` (escapes counted as written).
    /// For estimating completion tokens when the stream breaks before usage arrives.
    #[must_use]
    pub fn content_bytes(&self) -> u64 {
        self.content_bytes
    }

    /// Whether a `data: [DONE]` event was seen.
    #[must_use]
    pub fn done(&self) -> bool {
        self.done
    }

    /// Closes the current block (stripping only); returns whether it was dropped.
    fn end_block(
        &mut self,
        chunk: &[u8],
        in_chunk: Range<usize>,
        is_usage_event: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        let total = self.block_len.saturating_add(in_chunk.len());
        let drop = is_usage_event && !self.block_committed && total <= MAX_EVENT_BYTES;
        if drop {
            self.held.clear();
        } else {
            out.append(&mut self.held);
            out.extend_from_slice(&chunk[in_chunk]);
        }
        self.block_len = 0;
        self.block_committed = false;
        drop
    }

    /// One complete line (without its terminator). Returns `Some(is_usage_event)` when the
    /// line is blank, i.e. it ends an event.
    fn process_line(&mut self, line: &[u8]) -> Option<bool> {
        if line.is_empty() {
            return Some(self.dispatch());
        }
        if line.len() > MAX_EVENT_BYTES {
            self.event_overflow = true;
            return None;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(0) => return None, // comment
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        if field != b"data" || self.event_overflow {
            return None;
        }
        let sep = usize::from(self.has_data);
        if self.data.len() + sep + value.len() > MAX_EVENT_BYTES {
            self.event_overflow = true;
            return None;
        }
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.has_data = true;
        None
    }

    /// Ends the current event: analyses its data and resets it. Returns whether it was a
    /// usage-only event.
    fn dispatch(&mut self) -> bool {
        let is_usage_event = self.has_data && !self.event_overflow && self.analyze();
        self.data.clear();
        self.has_data = false;
        self.event_overflow = false;
        is_usage_event
    }

    fn analyze(&mut self) -> bool {
        let data = self.data.trim_ascii();
        if data == b"[DONE]" {
            self.done = true;
            return false;
        }
        let (text, has_usage) = keys(data);
        let text = if text == 0 && !has_usage {
            super::other_text(data)
        } else {
            text
        };
        self.content_bytes = self.content_bytes.saturating_add(text);
        if !has_usage {
            return false;
        }
        let Some((Some(raw), choices_empty)) = flat::chunk(data).or_else(|| serde_chunk(data))
        else {
            return false;
        };
        if let Some(usage) = raw.into_usage() {
            self.usage = Some(usage);
        }
        choices_empty == Some(true)
    }
}
