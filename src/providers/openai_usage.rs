//! OpenAI-format usage: whole JSON bodies (chat completions, embeddings, the Responses API)
//! and the chat completions SSE stream, parsed incrementally as it passes.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::usage::Usage;

/// The `usage` object as providers spell it. `input_tokens`/`output_tokens` are accepted for
/// OpenAI-compatible providers that use the Responses-API names.
#[derive(Deserialize, Debug, Default, PartialEq, Eq)]
struct RawUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    /// Chat completions: `prompt_tokens_details.cached_tokens`.
    #[serde(default)]
    prompt_tokens_details: Option<CachedDetails>,
    /// Responses API: `input_tokens_details.cached_tokens`.
    #[serde(default)]
    input_tokens_details: Option<CachedDetails>,
}

#[derive(Deserialize, Debug, Default, PartialEq, Eq)]
struct CachedDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl RawUsage {
    /// None when the object carries no counts at all, so the caller estimates instead of
    /// charging zero (SPEC §4: never zero).
    fn into_usage(self) -> Option<Usage> {
        let mut usage = self.counts()?;
        let cached = self
            .prompt_tokens_details
            .or(self.input_tokens_details)
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        // Cached tokens are part of the prompt; a report claiming more is clamped.
        usage.cache_read_tokens = cached.min(usage.prompt_tokens);
        Some(usage)
    }

    fn counts(&self) -> Option<Usage> {
        match (
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
        ) {
            (None, None, None) => None,
            // Embeddings-style providers that only report a total.
            (None, None, Some(total)) => Some(Usage::new(total, 0)),
            (prompt, completion, total) => {
                let prompt_tokens = prompt.unwrap_or(0);
                let completion_tokens = completion
                    .unwrap_or_else(|| total.map_or(0, |t| t.saturating_sub(prompt_tokens)));
                Some(Usage::new(prompt_tokens, completion_tokens))
            }
        }
    }
}

/// A whole response body: only `usage` is materialised, serde skips everything else.
#[derive(Deserialize)]
struct UsageBody {
    #[serde(default)]
    usage: Option<RawUsage>,
}

/// One stream chunk that mentions a usage object. `Vec<IgnoredAny>` never allocates.
#[derive(Deserialize)]
struct ChunkProbe {
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
}

/// A stream chunk as serde reads it: its `usage`, and whether its `choices` is empty (None
/// when null or absent); None when it is not a JSON object of that shape.
fn serde_chunk(data: &[u8]) -> Option<(Option<RawUsage>, Option<bool>)> {
    let probe = serde_json::from_slice::<ChunkProbe>(data).ok()?;
    Some((probe.usage, probe.choices.map(|c| c.is_empty())))
}

/// Usage from a complete (non-streamed) OpenAI JSON response body: chat completions
/// (`usage.prompt_tokens`, `usage.completion_tokens`) and embeddings (`usage.prompt_tokens`,
/// completion 0; `total_tokens` may be present). Returns None if absent/malformed, or if the
/// `usage` object has no counts. A body with only `total_tokens` counts it as prompt tokens;
/// one without `completion_tokens` but with a larger `total_tokens` takes the difference.
#[must_use]
pub fn usage_from_json(body: &[u8]) -> Option<Usage> {
    match trailing_usage(body) {
        Some(usage) => usage,
        None => serde_json::from_slice::<UsageBody>(body)
            .ok()?
            .usage?
            .into_usage(),
    }
}

/// Fast path: OpenAI puts `usage` last in the top-level object, so parse just that member,
/// found from the end. `None` means "not in that shape" (the caller parses the whole body);
/// it is only trusted when the key is structural (preceded by `{` or `,`, which a quote inside
/// a string never is) and the usage value is followed by nothing but the closing `}`.
fn trailing_usage(body: &[u8]) -> Option<Option<Usage>> {
    let at = rfind_usage_key(body)?;
    let before = body[..at].iter().rev().find(|b| !b.is_ascii_whitespace())?;
    if !matches!(before, b'{' | b',') {
        return None;
    }
    let rest = &body[at + b"\"usage\"".len()..];
    let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    let value = &rest[colon + 1..];
    let (usage, used) = match flat::usage(value) {
        Some(scanned) => scanned,
        None => {
            let mut stream =
                serde_json::Deserializer::from_slice(value).into_iter::<Option<RawUsage>>();
            let usage = stream.next()?.ok()?;
            (usage, stream.byte_offset())
        }
    };
    let mut tail = value[used..].iter().filter(|b| !b.is_ascii_whitespace());
    match (tail.next(), tail.next()) {
        (Some(b'}'), None) => Some(usage.and_then(RawUsage::into_usage)),
        _ => None,
    }
}

/// Where the last `"usage"` in `body` starts. The usage sits near the end, so the `u`s are
/// looked for from the end (a vectorised byte search) and each checked in place: a few
/// dozen instructions where the general reverse substring search took ~450 a response.
fn rfind_usage_key(body: &[u8]) -> Option<usize> {
    const KEY: &[u8] = b"\"usage\"";
    memchr::memrchr_iter(b'u', body)
        .filter_map(|u| u.checked_sub(1))
        .find(|&at| body[at..].starts_with(KEY))
}

#[cfg(test)]
mod usage_key_tests {
    use super::rfind_usage_key;
    use memchr::memmem::FinderRev;
    use proptest::prelude::*;

    #[test]
    fn the_last_usage_key_is_found() {
        for (body, at) in [
            (&b"{\"usage\":{}}"[..], Some(1)),
            (b"{\"a\":\"usage\",\"usage\":null}", Some(13)),
            (b"\"usage\"", Some(0)),
            (b"usage\"", None),
            (b"\"usag", None),
            (b"", None),
            (b"u", None),
            (b"\"\"usage\"\"", Some(1)),
        ] {
            assert_eq!(
                rfind_usage_key(body),
                at,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    proptest! {
        #[test]
        fn it_agrees_with_a_reverse_substring_search(
            parts in proptest::collection::vec(
                prop_oneof![Just(&b"\"usage\""[..]), Just(&b"u"[..]), Just(&b"\""[..]),
                            Just(&b"usage"[..]), Just(&b"x"[..]), Just(&b"\"usag"[..])],
                0..12,
            )
        ) {
            let body = parts.concat();
            let expected = FinderRev::new(b"\"usage\"").rfind(&body);
            prop_assert_eq!(rfind_usage_key(&body), expected);
        }
    }
}

/// A scanner for the usage objects providers actually send (`{"prompt_tokens":12,...}`, with
/// flat `*_details` objects of counts), ~5x cheaper than serde on them. It reads a strict
/// subset of JSON and gives up (`None`) on anything else: an escape or a non-ASCII byte in a
/// key, a value that is not an unsigned integer, `null` or a flat object of those, a number
/// beyond u64, a field named twice. Serde then reads the value as before, so whatever this
/// accepts it reads exactly as serde would (the tests compare the two).
mod flat {
    use super::{CachedDetails, RawUsage};

    struct Cursor<'a> {
        s: &'a [u8],
        at: usize,
    }

    impl<'a> Cursor<'a> {
        fn ws(&mut self) {
            while self
                .s
                .get(self.at)
                .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
            {
                self.at += 1;
            }
        }

        /// The next non-space byte, consumed.
        fn next(&mut self) -> Option<u8> {
            self.ws();
            let b = *self.s.get(self.at)?;
            self.at += 1;
            Some(b)
        }

        fn peek(&mut self) -> Option<u8> {
            self.ws();
            self.s.get(self.at).copied()
        }

        /// A key (after its opening quote was consumed): plain ASCII, no escapes.
        fn key(&mut self) -> Option<&'a [u8]> {
            let rest = &self.s[self.at..];
            let len = memchr::memchr(b'"', rest)?;
            let key = &rest[..len];
            if key
                .iter()
                .any(|&b| b == b'\\' || !(0x20..0x80).contains(&b))
            {
                return None;
            }
            self.at += len + 1;
            Some(key)
        }

        /// `null` or an unsigned integer in JSON's grammar that fits a u64.
        #[cfg(test)]
        fn count(&mut self) -> Option<Option<u64>> {
            self.ws();
            if self.s[self.at..].starts_with(b"null") {
                self.at += 4;
                return self.end_of_value().then_some(None);
            }
            let start = self.at;
            let mut n: u64 = 0;
            while let Some(d) = self
                .s
                .get(self.at)
                .and_then(|b| b.checked_sub(b'0'))
                .filter(|d| *d < 10)
            {
                n = n.checked_mul(10)?.checked_add(u64::from(d))?;
                self.at += 1;
            }
            let len = self.at - start;
            if len == 0 || (len > 1 && self.s[start] == b'0') || !self.end_of_value() {
                return None;
            }
            Some(Some(n))
        }

        /// What may follow a value: space, `,` or `}` (a `.`, `e` or letter means the value
        /// was not what it seemed).
        fn end_of_value(&self) -> bool {
            self.s
                .get(self.at)
                .is_none_or(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b',' | b'}'))
        }

        /// `{ "key": value, ... }` (the `{` consumed), calling `field` for each member; the
        /// callback reads the value and returns false to give up.
        fn members(&mut self, mut field: impl FnMut(&mut Self, &'a [u8]) -> bool) -> Option<()> {
            if self.peek()? == b'}' {
                self.at += 1;
                return Some(());
            }
            loop {
                if self.next()? != b'"' {
                    return None;
                }
                let key = self.key()?;
                if self.next()? != b':' || !field(self, key) {
                    return None;
                }
                match self.next()? {
                    b',' => {}
                    b'}' => return Some(()),
                    _ => return None,
                }
            }
        }
    }

    /// Sets `slot` once; a second value for it gives up (serde refuses a duplicate field).
    #[cfg(test)]
    fn once<T>(slot: &mut Option<T>, seen: &mut bool, value: Option<T>) -> bool {
        if std::mem::replace(seen, true) {
            return false;
        }
        *slot = value;
        true
    }

    #[cfg(test)]
    fn details_before(c: &mut Cursor<'_>) -> Option<Option<CachedDetails>> {
        if c.peek()? == b'n' {
            return c.count().filter(Option::is_none).map(|_| None);
        }
        if c.next()? != b'{' {
            return None;
        }
        let mut d = CachedDetails::default();
        let mut seen = false;
        c.members(|c, key| match c.count() {
            Some(v) if key == b"cached_tokens" => once(&mut d.cached_tokens, &mut seen, v),
            Some(_) => true,
            None => false,
        })?;
        Some(Some(d))
    }

    /// A string's body (after its opening quote), as serde skips one: any bytes but control
    /// characters, and the escapes JSON has (`\u` with four hex digits; the code point is not
    /// checked, as serde does not check it in a value it ignores).
    fn skip_string(c: &mut Cursor<'_>) -> bool {
        loop {
            // Eight bytes a step to the next quote, backslash or control byte.
            c.at = crate::providers::json_scan::plain_run(c.s, c.at);
            let Some(&stop) = c.s.get(c.at) else {
                return false;
            };
            c.at += 1;
            match stop {
                b'"' => return true,
                b'\\' => match c.s.get(c.at) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => c.at += 1,
                    Some(b'u') => {
                        let hex = c.s.get(c.at + 1..c.at + 5);
                        if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                            return false;
                        }
                        c.at += 5;
                    }
                    _ => return false,
                },
                _ => return false,
            }
        }
    }

    /// A number in JSON's grammar: `-`, then `0` or digits not starting with `0`, then an
    /// optional fraction and exponent.
    fn skip_number(c: &mut Cursor<'_>) -> bool {
        let digits = |c: &mut Cursor<'_>| {
            let n = c.s[c.at..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            c.at += n;
            n
        };
        if c.s.get(c.at) == Some(&b'-') {
            c.at += 1;
        }
        match c.s.get(c.at) {
            Some(b'0') => c.at += 1,
            Some(b'1'..=b'9') => {
                digits(c);
            }
            _ => return false,
        }
        if c.s.get(c.at) == Some(&b'.') {
            c.at += 1;
            if digits(c) == 0 {
                return false;
            }
        }
        if matches!(c.s.get(c.at), Some(b'e' | b'E')) {
            c.at += 1;
            if matches!(c.s.get(c.at), Some(b'+' | b'-')) {
                c.at += 1;
            }
            if digits(c) == 0 {
                return false;
            }
        }
        c.end_of_value() || c.s.get(c.at) == Some(&b']')
    }

    /// Nesting deeper than this is left to serde.
    const MAX_DEPTH: u32 = 32;

    /// Any JSON value, read only to be skipped (as serde reads an ignored field).
    fn skip_value(c: &mut Cursor<'_>, depth: u32) -> bool {
        let Some(b) = c.peek() else {
            return false;
        };
        let literal = |c: &mut Cursor<'_>, word: &[u8]| {
            if !c.s[c.at..].starts_with(word) {
                return false;
            }
            c.at += word.len();
            c.end_of_value() || c.s.get(c.at) == Some(&b']')
        };
        match b {
            b'"' => {
                c.at += 1;
                skip_string(c)
            }
            b'{' if depth < MAX_DEPTH => {
                c.at += 1;
                c.members(|c, _| skip_value(c, depth + 1)).is_some()
            }
            b'[' if depth < MAX_DEPTH => {
                c.at += 1;
                skip_elements(c, depth + 1).is_some()
            }
            b't' => literal(c, b"true"),
            b'f' => literal(c, b"false"),
            b'n' => literal(c, b"null"),
            b'-' | b'0'..=b'9' => skip_number(c),
            _ => false,
        }
    }

    /// An array's elements and its `]` (the `[` consumed); whether it had any.
    fn skip_elements(c: &mut Cursor<'_>, depth: u32) -> Option<bool> {
        if c.peek()? == b']' {
            c.at += 1;
            return Some(false);
        }
        loop {
            if !skip_value(c, depth) {
                return None;
            }
            match c.next()? {
                b',' => {}
                b']' => return Some(true),
                _ => return None,
            }
        }
    }

    /// What serde reads from one stream chunk as a `ChunkProbe`: its `usage` and whether its
    /// `choices` is empty (`None` when it is null or absent). The whole chunk must be one JSON
    /// object in the scanner's grammar (keys without escapes, nesting of at most
    /// [`MAX_DEPTH`], `usage` as [`usage`] reads it, `choices` null or an array), else `None`
    /// and serde reads it: what this accepts, serde reads the same (the tests compare them).
    pub(super) fn chunk(s: &[u8]) -> Option<(Option<RawUsage>, Option<bool>)> {
        let mut c = Cursor { s, at: 0 };
        if c.next()? != b'{' {
            return None;
        }
        let mut found = None;
        let mut choices = None;
        let mut seen = [false; 2];
        c.members(|c, key| match key {
            b"usage" => match usage(&c.s[c.at..]) {
                Some((u, used)) if !std::mem::replace(&mut seen[0], true) => {
                    c.at += used;
                    found = u;
                    true
                }
                _ => false,
            },
            b"choices" if !std::mem::replace(&mut seen[1], true) => match c.peek() {
                Some(b'n') => skip_value(c, 1),
                Some(b'[') => {
                    c.at += 1;
                    choices = skip_elements(c, 2).map(|any| !any);
                    choices.is_some()
                }
                _ => false,
            },
            b"choices" => false,
            _ => skip_value(c, 1),
        })?;
        c.ws();
        (c.at == s.len()).then_some((found, choices))
    }

    /// [`usage`] as it was before it was rewritten for speed (built on [`Cursor`] like
    /// [`chunk`]), kept so the tests hold the rewrite to the same answers, refusals included.
    #[cfg(test)]
    pub(super) fn usage_before(s: &[u8]) -> Option<(Option<RawUsage>, usize)> {
        let mut c = Cursor { s, at: 0 };
        if c.peek()? == b'n' {
            return c.count().filter(Option::is_none).map(|_| (None, c.at));
        }
        if c.next()? != b'{' {
            return None;
        }
        let mut u = RawUsage::default();
        let mut seen = [false; 5];
        c.members(|c, key| match key {
            b"prompt_tokens" | b"input_tokens" => c
                .count()
                .is_some_and(|v| once(&mut u.prompt_tokens, &mut seen[0], v)),
            b"completion_tokens" | b"output_tokens" => c
                .count()
                .is_some_and(|v| once(&mut u.completion_tokens, &mut seen[1], v)),
            b"total_tokens" => c
                .count()
                .is_some_and(|v| once(&mut u.total_tokens, &mut seen[2], v)),
            b"prompt_tokens_details" => details_before(c)
                .is_some_and(|v| once(&mut u.prompt_tokens_details, &mut seen[3], v)),
            b"input_tokens_details" => details_before(c)
                .is_some_and(|v| once(&mut u.input_tokens_details, &mut seen[4], v)),
            _ => match c.peek() {
                Some(b'{') => details_before(c).is_some(),
                _ => c.count().is_some(),
            },
        })?;
        Some((Some(u), c.at))
    }

    /// The usage value at the start of `s` (`null` or an object) and the bytes it took.
    ///
    /// Reads exactly what `usage_before` read (the tests compare the two on generated and
    /// damaged objects) in under half the instructions (~510 where it took ~1,130 on a
    /// three-count object): one pass over plain indices, the keys providers send recognised by
    /// one fixed-length compare each instead of a search for the closing quote, a check of
    /// every key byte and a compare per field name.
    pub(super) fn usage(s: &[u8]) -> Option<(Option<RawUsage>, usize)> {
        let mut i = skip_ws(s, 0);
        match *s.get(i)? {
            b'n' => {
                let end = i + 4;
                let ends = s
                    .get(end)
                    .is_none_or(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b',' | b'}'));
                return (s[i..].starts_with(b"null") && ends).then_some((None, end));
            }
            b'{' => {}
            _ => return None,
        }
        let mut u = RawUsage::default();
        // One flag per field, aliases sharing one (serde refuses `prompt_tokens` with
        // `input_tokens` as a duplicate).
        let mut seen = [false; 5];
        i = skip_ws(s, i + 1);
        if *s.get(i)? == b'}' {
            return Some((Some(u), i + 1));
        }
        loop {
            if *s.get(i)? != b'"' {
                return None;
            }
            let (field, after) = field(s, i + 1)?;
            i = skip_ws(s, after);
            if *s.get(i)? != b':' {
                return None;
            }
            i = skip_ws(s, i + 1);
            i = match field {
                Field::Prompt => set(&mut u.prompt_tokens, &mut seen[0], count(s, i)?)?,
                Field::Completion => set(&mut u.completion_tokens, &mut seen[1], count(s, i)?)?,
                Field::Total => set(&mut u.total_tokens, &mut seen[2], count(s, i)?)?,
                Field::PromptDetails => {
                    set(&mut u.prompt_tokens_details, &mut seen[3], details(s, i)?)?
                }
                Field::InputDetails => {
                    set(&mut u.input_tokens_details, &mut seen[4], details(s, i)?)?
                }
                Field::Other if s.get(i) == Some(&b'{') => details(s, i)?.1,
                Field::Other => count(s, i)?.1,
            };
            i = skip_ws(s, i);
            match *s.get(i)? {
                b',' => i = skip_ws(s, i + 1),
                b'}' => return Some((Some(u), i + 1)),
                _ => return None,
            }
        }
    }

    /// The `RawUsage` field a key names; `Other` is one serde ignores.
    #[derive(Clone, Copy)]
    enum Field {
        Prompt,
        Completion,
        Total,
        PromptDetails,
        InputDetails,
        Other,
    }

    /// The key whose body starts at `s[i]` (after its opening quote) and the index after its
    /// closing quote. The keys serde maps are each one fixed-length compare, closing quote
    /// included (so `prompt_tokensX` is not `prompt_tokens`); any other key is read as
    /// [`plain_key`] reads it.
    fn field(s: &[u8], i: usize) -> Option<(Field, usize)> {
        let rest = s.get(i..)?;
        let known = match rest.first() {
            Some(b'p') => is(rest, b"prompt_tokens\"")
                .map(|n| (Field::Prompt, n))
                .or_else(|| {
                    is(rest, b"prompt_tokens_details\"").map(|n| (Field::PromptDetails, n))
                }),
            Some(b'c') => is(rest, b"completion_tokens\"").map(|n| (Field::Completion, n)),
            Some(b't') => is(rest, b"total_tokens\"").map(|n| (Field::Total, n)),
            Some(b'i') => is(rest, b"input_tokens\"")
                .map(|n| (Field::Prompt, n))
                .or_else(|| is(rest, b"input_tokens_details\"").map(|n| (Field::InputDetails, n))),
            Some(b'o') => is(rest, b"output_tokens\"").map(|n| (Field::Completion, n)),
            _ => None,
        };
        match known {
            Some((field, len)) => Some((field, i + len)),
            None => Some((Field::Other, plain_key(s, i)?)),
        }
    }

    /// `key` (closing quote included) at the start of `rest`: an array compare, which the
    /// compiler turns into a couple of word loads where a slice compare stays a loop or a call.
    /// Its length when it is there.
    fn is<const N: usize>(rest: &[u8], key: &[u8; N]) -> Option<usize> {
        (rest.first_chunk::<N>() == Some(key)).then_some(N)
    }

    /// A key whose body starts at `s[i]`, as [`Cursor::key`] reads one (plain ASCII, no
    /// escapes: the same first quote ends it and the same bytes are refused), and the index
    /// after its closing quote.
    fn plain_key(s: &[u8], i: usize) -> Option<usize> {
        let rest = s.get(i..)?;
        let len = rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || !(0x20..0x80).contains(&b))?;
        (rest[len] == b'"').then_some(i + len + 1)
    }

    fn skip_ws(s: &[u8], mut i: usize) -> usize {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = s.get(i) {
            i += 1;
        }
        i
    }

    /// `null` or an unsigned integer in JSON's grammar that fits a u64, at `s[i]`, and the
    /// index after it. What may follow is the caller's to check: it takes only space, `,` or
    /// `}` next, which refuses `1.5`, `1e3` or `nullx` as `Cursor::end_of_value` did.
    fn count(s: &[u8], i: usize) -> Option<(Option<u64>, usize)> {
        let digits = s.get(i..)?;
        let mut n: u64 = 0;
        let mut len = 0;
        while let Some(d) = digits
            .get(len)
            .map(|b| b.wrapping_sub(b'0'))
            .filter(|d| *d < 10)
        {
            n = n.checked_mul(10)?.checked_add(u64::from(d))?;
            len += 1;
        }
        match len {
            0 => digits.starts_with(b"null").then_some((None, i + 4)),
            // JSON has no leading zeros.
            1 => Some((Some(n), i + 1)),
            _ => (digits[0] != b'0').then_some((Some(n), i + len)),
        }
    }

    /// A `*_details` value at `s[i]`, `null` or a flat object of counts read as
    /// `CachedDetails` (`cached_tokens` at most once, any other key any number of times, as
    /// serde ignores it), and the index after it.
    fn details(s: &[u8], i: usize) -> Option<(Option<CachedDetails>, usize)> {
        match *s.get(i)? {
            b'n' => return s[i..].starts_with(b"null").then_some((None, i + 4)),
            b'{' => {}
            _ => return None,
        }
        let mut d = CachedDetails::default();
        let mut seen = false;
        let mut i = skip_ws(s, i + 1);
        if *s.get(i)? == b'}' {
            return Some((Some(d), i + 1));
        }
        loop {
            if *s.get(i)? != b'"' {
                return None;
            }
            let rest = s.get(i + 1..)?;
            let (cached, after) = match is(rest, b"cached_tokens\"") {
                Some(len) => (true, i + 1 + len),
                None => (false, plain_key(s, i + 1)?),
            };
            i = skip_ws(s, after);
            if *s.get(i)? != b':' {
                return None;
            }
            let value = count(s, skip_ws(s, i + 1))?;
            i = if cached {
                set(&mut d.cached_tokens, &mut seen, value)?
            } else {
                value.1
            };
            i = skip_ws(s, i);
            match *s.get(i)? {
                b',' => i = skip_ws(s, i + 1),
                b'}' => return Some((Some(d), i + 1)),
                _ => return None,
            }
        }
    }

    /// Sets `slot` to a value read and gives the index after the value; a second value for
    /// the slot gives up (serde refuses a duplicate field).
    fn set<T>(
        slot: &mut Option<T>,
        seen: &mut bool,
        (value, end): (Option<T>, usize),
    ) -> Option<usize> {
        if std::mem::replace(seen, true) {
            return None;
        }
        *slot = value;
        Some(end)
    }
}

/// Events (and lines) longer than this are passed through but not analysed, and are never
/// stripped, so a hostile upstream cannot make the parser buffer without bound. A realistic
/// OpenAI event is well under 100 KiB.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
/// Matches the keys `content` and `reasoning_content` (checked by `is_text_key`).
static CONTENT_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"content\""));
static ARGUMENTS_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"arguments\""));

/// What to forward for one fed chunk.
#[must_use = "the bytes it names must be forwarded to the client"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// Forward the fed chunk exactly as it was given (zero copy for the caller).
    Unchanged,
    /// Forward only `chunk[range]` of the fed chunk (caller slices, zero copy). Never empty.
    Range(Range<usize>),
    /// Forward the fed chunk without `chunk[range]`: a usage event cut out of its middle. The
    /// caller can close the hole in place (the tail is usually just `data: [DONE]`), where a
    /// copy would allocate and copy the whole chunk. Neither side is empty.
    Without(Range<usize>),
    /// Forward these bytes instead (held-back bytes from earlier chunks joined with this one,
    /// or a chunk with more than one hole). Never empty.
    Owned(Vec<u8>),
    /// Forward nothing for now.
    Nothing,
}

impl Forward {
    /// The bytes to forward, given the chunk that was fed (`&[]` for `finish`).
    #[must_use]
    pub fn bytes<'a>(&'a self, chunk: &'a [u8]) -> Cow<'a, [u8]> {
        match self {
            Forward::Unchanged => Cow::Borrowed(chunk),
            Forward::Range(r) => Cow::Borrowed(chunk.get(r.clone()).unwrap_or(&[])),
            Forward::Without(hole) => Cow::Owned(without(chunk, hole.clone())),
            Forward::Owned(v) => Cow::Borrowed(v),
            Forward::Nothing => Cow::Borrowed(&[]),
        }
    }
}

/// `chunk` with `hole` cut out, copied.
#[must_use]
pub fn without(chunk: &[u8], hole: Range<usize>) -> Vec<u8> {
    let mut v = Vec::with_capacity(chunk.len() - hole.len());
    v.extend_from_slice(&chunk[..hole.start]);
    v.extend_from_slice(&chunk[hole.end..]);
    v
}

/// Builds the `Forward` for one chunk while stripping.
enum Out {
    Empty,
    Run(usize, usize),
    /// `chunk[start..end]` without `hole`.
    Cut {
        start: usize,
        hole: Range<usize>,
        end: usize,
    },
    Owned(Vec<u8>),
}

impl Out {
    /// Bytes held from earlier chunks; only ever the first thing emitted for a chunk.
    fn emit_held(&mut self, held: &mut Vec<u8>) {
        if !held.is_empty() {
            *self = Out::Owned(std::mem::take(held));
        }
    }

    fn emit_range(&mut self, chunk: &[u8], r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        match self {
            Out::Empty => *self = Out::Run(r.start, r.end),
            Out::Run(_, end) | Out::Cut { end, .. } if *end == r.start => *end = r.end,
            Out::Run(start, end) => {
                *self = Out::Cut {
                    start: *start,
                    hole: *end..r.start,
                    end: r.end,
                }
            }
            Out::Cut { start, hole, end } => {
                let mut v = cut_run(chunk, *start, hole.clone(), *end);
                v.extend_from_slice(&chunk[r]);
                *self = Out::Owned(v);
            }
            Out::Owned(v) => v.extend_from_slice(&chunk[r]),
        }
    }

    fn into_forward(self, chunk: &[u8]) -> Forward {
        let chunk_len = chunk.len();
        match self {
            Out::Empty => Forward::Nothing,
            Out::Run(0, end) if end == chunk_len => Forward::Unchanged,
            Out::Run(start, end) => Forward::Range(start..end),
            Out::Cut {
                start: 0,
                hole,
                end,
            } if end == chunk_len => Forward::Without(hole),
            Out::Cut { start, hole, end } => Forward::Owned(cut_run(chunk, start, hole, end)),
            Out::Owned(v) if v.is_empty() => Forward::Nothing,
            Out::Owned(v) => Forward::Owned(v),
        }
    }
}

/// `chunk[start..end]` without `hole` (which lies inside it), copied.
fn cut_run(chunk: &[u8], start: usize, hole: Range<usize>, end: usize) -> Vec<u8> {
    without(&chunk[start..end], hole.start - start..hole.end - start)
}

/// Incremental parser for an OpenAI-format SSE response stream (`data: {...}\n\n` events,
/// `data: [DONE]`). Fed chunk by chunk from a synchronous hook; never blocks, reuses its
/// buffers, and gives the same result for any split of the input into chunks.
///
/// Framing follows the WHATWG SSE spec (CRLF, LF or CR line ends; `:` comments; only `data:`
/// fields matter). An unterminated final line or event is still analysed by `finish`.
///
/// When stripping, the stream is cut into blocks, each ending at (and including) a blank
/// line; a block whose event is a usage-only event is dropped whole (with any `event:`, `id:`
/// or comment lines inside it). The forwarded bytes equal the input minus those blocks.
pub struct SseUsageParser {
    strip: bool,
    usage: Option<Usage>,
    content_bytes: u64,
    done: bool,

    /// Start of a line carried over from earlier chunks; capped at `MAX_EVENT_BYTES + 1`.
    line: Vec<u8>,
    /// The previous chunk ended in CR, so a leading LF in this chunk belongs to it.
    after_cr: bool,

    /// Data fields of the current event, joined with `\n`, when they had to be copied: the
    /// event has several `data:` lines, or it is still open when its chunk ends.
    data: Vec<u8>,
    /// The current event's one data field so far, where it lies in the chunk being fed: most
    /// events are one `data:` line inside one chunk, read in place without a copy. Only set
    /// during `feed`, and then `data` is empty.
    data_in_chunk: Option<Range<usize>>,
    /// Where the line of `data_in_chunk` starts.
    data_line_start: usize,
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

    /// The last event read in full, to read the next ones like it at a glance.
    shape: shape::EventShape,
    /// Set by `analyze` for an event a shape can be learned from: where its counted value
    /// lies in the data it was given (opening to closing quote), and its text bytes.
    learned: Option<(Range<usize>, u64)>,
    /// Events read by their shape (the tests check the shortcut is taken).
    #[cfg(test)]
    shaped: usize,
}

impl SseUsageParser {
    /// `strip_usage_event`: when true, the usage-only event (a data event whose JSON has a
    /// non-null `usage` object and `"choices": []`) is removed from the bytes passed on to the
    /// client, because the gateway asked the upstream for usage on the client's behalf
    /// (`stream_options.include_usage`) and the client did not ask for it.
    #[must_use]
    pub fn new(strip_usage_event: bool) -> Self {
        SseUsageParser {
            strip: strip_usage_event,
            usage: None,
            content_bytes: 0,
            done: false,
            line: Vec::new(),
            after_cr: false,
            data: Vec::new(),
            data_in_chunk: None,
            data_line_start: 0,
            has_data: false,
            event_overflow: false,
            held: Vec::new(),
            block_len: 0,
            block_committed: false,
            cr_ended_block: None,
            shape: shape::EventShape::default(),
            learned: None,
            #[cfg(test)]
            shaped: 0,
        }
    }

    /// Feed one chunk. Returns what to forward to the client for this chunk; always
    /// `Forward::Unchanged` when not stripping.
    pub fn feed(&mut self, chunk: &[u8]) -> Forward {
        if chunk.is_empty() {
            return if self.strip {
                Forward::Nothing
            } else {
                Forward::Unchanged
            };
        }
        let mut out = Out::Empty;
        let mut pos = 0;
        // In-chunk start of the current block's bytes (stripping only).
        let mut block_start = 0;
        let cr_ended_block = self.cr_ended_block.take();
        if std::mem::take(&mut self.after_cr) && chunk[0] == b'\n' {
            pos = 1;
            if let Some(dropped) = cr_ended_block {
                if !dropped {
                    out.emit_range(chunk, 0..1);
                }
                block_start = 1;
            }
        }
        loop {
            // At an event's start: the events shaped like the last one are read at a glance.
            if self.line.is_empty() && !self.has_data && !self.event_overflow {
                if let Some((end, text, _events)) = self.shape.read_run(chunk, pos) {
                    self.content_bytes = self.content_bytes.saturating_add(text);
                    #[cfg(test)]
                    {
                        self.shaped += _events;
                    }
                    // Kept blocks side by side: closed as one.
                    if self.strip {
                        self.end_block(chunk, block_start..end, false, &mut out);
                    }
                    block_start = end;
                    pos = end;
                    continue;
                }
            }
            let Some(eol) = line_end(chunk, pos) else {
                break;
            };
            let mut next = eol + 1;
            if chunk[eol] == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            let ended = if self.line.is_empty() {
                self.process_line(chunk, pos..eol)
            } else {
                push_capped(&mut self.line, &chunk[pos..eol]);
                let line = std::mem::take(&mut self.line);
                // Not blank (it has bytes from an earlier chunk), so it ends no event.
                self.process_carried_line(&line);
                self.line = line;
                self.line.clear();
                None
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
        // The chunk goes back to the caller: an event still open keeps its own copy.
        self.copy_data_in_chunk(chunk);
        if !self.strip {
            return Forward::Unchanged;
        }
        if block_start < chunk.len() {
            self.block_len = self.block_len.saturating_add(chunk.len() - block_start);
            if !self.block_committed && self.block_len > MAX_EVENT_BYTES {
                self.block_committed = true;
                out.emit_held(&mut self.held);
            }
            if self.block_committed {
                out.emit_range(chunk, block_start..chunk.len());
            } else {
                self.held.extend_from_slice(&chunk[block_start..]);
            }
        }
        out.into_forward(chunk)
    }

    /// Call at end of stream: returns any held-back bytes that must still be forwarded
    /// (e.g. an incomplete final event that is not a usage event). An unterminated final
    /// line and event are analysed as if they had been terminated.
    pub fn finish(&mut self) -> Forward {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            // A line cannot end a block here: it is non-empty.
            self.process_carried_line(&line);
            self.line = line;
            self.line.clear();
        }
        self.after_cr = false;
        self.cr_ended_block = None;
        let is_usage_event = self.dispatch(&[]);
        let held = std::mem::take(&mut self.held);
        let dropped = is_usage_event && !self.block_committed && self.block_len <= MAX_EVENT_BYTES;
        self.block_len = 0;
        self.block_committed = false;
        if !self.strip || dropped || held.is_empty() {
            self.held = held;
            self.held.clear();
            Forward::Nothing
        } else {
            Forward::Owned(held)
        }
    }

    /// Last usage seen in any event (OpenAI puts it in the final chunk; some providers put a
    /// `usage` on a content chunk: any non-null usage object counts, the last one wins).
    #[must_use]
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Raw JSON-string bytes of generated text seen so far: `content` and
    /// `reasoning_content` values and tool-call `arguments` (escapes counted as written),
    /// and in an event without those, the values of [`OTHER_KEYS`]. For estimating
    /// completion tokens when the stream breaks before usage arrives.
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
        out: &mut Out,
    ) -> bool {
        let total = self.block_len.saturating_add(in_chunk.len());
        let drop = is_usage_event && !self.block_committed && total <= MAX_EVENT_BYTES;
        if drop {
            self.held.clear();
        } else {
            out.emit_held(&mut self.held);
            out.emit_range(chunk, in_chunk);
        }
        self.block_len = 0;
        self.block_committed = false;
        drop
    }

    /// One complete line of `chunk` (without its terminator). Returns `Some(is_usage_event)`
    /// when the line is blank, i.e. it ends an event.
    fn process_line(&mut self, chunk: &[u8], line: Range<usize>) -> Option<bool> {
        if line.is_empty() {
            let data = self.data_in_chunk.clone();
            let is_usage_event = self.dispatch(chunk);
            if let (Some(data), Some((value, text))) = (data, self.learned.take()) {
                self.learn_shape(chunk, data, line.start, value, text);
            }
            return Some(is_usage_event);
        }
        let value = self.data_value(&chunk[line.clone()])?;
        if !self.has_data {
            self.has_data = true;
            self.data_in_chunk = Some(line.start + value.start..line.end);
            self.data_line_start = line.start;
            return None;
        }
        self.copy_data_in_chunk(chunk);
        self.push_data(&chunk[line][value]);
        None
    }

    /// Learns the shape of an event read in place: its one data line (`data` its value) and
    /// the blank line at `blank`, each ended by LF or CRLF (a CR alone could be the first half
    /// of a CRLF split across chunks), `value` its counted value in `data`.
    fn learn_shape(
        &mut self,
        chunk: &[u8],
        data: Range<usize>,
        blank: usize,
        value: Range<usize>,
        text: u64,
    ) {
        let ends = &chunk[data.end..];
        let end = if blank == data.end + 1 && ends.starts_with(b"\n\n") {
            data.end + 2
        } else if blank == data.end + 2 && ends.starts_with(b"\r\n\r\n") {
            data.end + 4
        } else {
            return;
        };
        let (open, close) = (data.start + value.start, data.start + value.end - 1);
        let other_text = text - (close - open - 1) as u64;
        self.shape.learn(
            &chunk[self.data_line_start..=open],
            &chunk[close..end],
            other_text,
        );
    }

    /// A line begun in an earlier chunk, so never blank; its data is copied.
    fn process_carried_line(&mut self, line: &[u8]) {
        if let Some(value) = self.data_value(line) {
            self.push_data(&line[value]);
        }
    }

    /// Where the value of a `data:` field of the current event lies in `line` (not blank), if
    /// the line is one that counts: comments, other fields, lines past the cap and the lines
    /// of an event that outgrew the cap are not.
    fn data_value(&mut self, line: &[u8]) -> Option<Range<usize>> {
        if line.len() > MAX_EVENT_BYTES {
            self.event_overflow = true;
            return None;
        }
        let (field, value_start) = field_and_value(line)?;
        if field != b"data" || self.event_overflow {
            return None;
        }
        let value_len = line.len() - value_start;
        let sep = usize::from(self.has_data);
        if self.data_len() + sep + value_len > MAX_EVENT_BYTES {
            self.event_overflow = true;
            return None;
        }
        Some(value_start..line.len())
    }

    fn data_len(&self) -> usize {
        self.data_in_chunk
            .as_ref()
            .map_or(self.data.len(), ExactSizeIterator::len)
    }

    /// Appends one data field's value (checked against the cap) to the copied data.
    fn push_data(&mut self, value: &[u8]) {
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.has_data = true;
    }

    /// The current event's data, until now read in place in `chunk`, is copied: the event
    /// goes on past a line or past the chunk.
    fn copy_data_in_chunk(&mut self, chunk: &[u8]) {
        if let Some(r) = self.data_in_chunk.take() {
            self.data.extend_from_slice(&chunk[r]);
        }
    }

    /// Ends the current event: analyses its data (in `chunk`, or copied) and resets it.
    /// Returns whether it was a usage-only event.
    fn dispatch(&mut self, chunk: &[u8]) -> bool {
        self.learned = None;
        let in_chunk = self.data_in_chunk.take();
        let is_usage_event = self.has_data && !self.event_overflow && {
            // Moved out for the call, so the analysis can update `self`.
            let copied = std::mem::take(&mut self.data);
            let data = in_chunk.map_or(&copied[..], |r| &chunk[r]);
            let is_usage_event = self.analyze(data);
            self.data = copied;
            is_usage_event
        };
        self.data.clear();
        self.has_data = false;
        self.event_overflow = false;
        is_usage_event
    }

    fn analyze(&mut self, untrimmed: &[u8]) -> bool {
        let data = untrimmed.trim_ascii();
        if data == b"[DONE]" {
            self.done = true;
            return false;
        }
        let KeysRead {
            mut text,
            has_usage,
            mut value,
            other,
        } = keys_and_value(data);
        if text == 0 && !has_usage && other > 0 {
            // Read in full every time: a shape counts only the keys' values.
            (text, value) = (other, None);
        }
        self.content_bytes = self.content_bytes.saturating_add(text);
        if !has_usage {
            let lead = untrimmed.len() - untrimmed.trim_ascii_start().len();
            self.learned = value.map(|v| (v.start + lead..v.end + lead, text));
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

/// The end of the line that starts at `from` in `chunk`, if the chunk holds it. A blank line
/// (half of every event) is seen without a search.
fn line_end(chunk: &[u8], from: usize) -> Option<usize> {
    match chunk.get(from)? {
        b'\n' | b'\r' => Some(from),
        _ => memchr::memchr2(b'\n', b'\r', &chunk[from + 1..]).map(|i| from + 1 + i),
    }
}

/// A non-blank line's field name and where its value starts (after `:` and one space); None
/// for a comment. `data:` lines, nearly all of a stream, are told without a search.
fn field_and_value(line: &[u8]) -> Option<(&[u8], usize)> {
    let colon = if line.starts_with(b"data:") {
        4
    } else {
        match memchr::memchr(b':', line) {
            Some(0) => return None,
            Some(i) => i,
            None => return Some((line, line.len())),
        }
    };
    let value_start = colon + 1 + usize::from(line.get(colon + 1) == Some(&b' '));
    Some((&line[..colon], value_start))
}

/// Appends to a carried-over line, keeping at most `MAX_EVENT_BYTES + 1` bytes so that
/// "longer than the cap" is decided the same way however the line was split.
fn push_capped(line: &mut Vec<u8>, bytes: &[u8]) {
    let room = (MAX_EVENT_BYTES + 1).saturating_sub(line.len());
    line.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

fn skip_ws(data: &[u8], mut i: usize) -> usize {
    while matches!(data.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Index just after `"key"` `:` and whitespace, if a colon follows `key_end`.
fn after_colon(data: &[u8], key_end: usize) -> Option<usize> {
    let i = skip_ws(data, key_end);
    (data.get(i) == Some(&b':')).then(|| skip_ws(data, i + 1))
}

/// The keys an event is searched for: `content"` (the tail of `"content"` and
/// `"reasoning_content"`), `"arguments"` and `"usage"`, then [`OTHER_KEY_NAMES`]. None
/// where the CPU has no packed searcher (then each is searched for on its own). No two of
/// them can match at the same place (each differs from every other within its first four
/// bytes), so visiting every place where one starts visits every match of each.
static KEYS: LazyLock<Option<aho_corasick::packed::Searcher>> = LazyLock::new(|| {
    aho_corasick::packed::Config::new()
        .builder()
        .extend([&b"content\""[..], b"\"arguments\"", b"\"usage\""])
        .extend(OTHER_KEY_NAMES)
        .build()
});

/// [`keys_and_value`] without the value: the reading the reference parser is held to.
#[cfg(test)]
fn keys(data: &[u8]) -> (u64, bool) {
    let read = keys_and_value(data);
    (read.text, read.has_usage)
}

/// What one pass over an event reads: see [`keys_and_value`].
struct KeysRead {
    /// [`text_bytes`].
    text: u64,
    /// [`has_usage_object`].
    has_usage: bool,
    /// The first counted string value no colon follows (what a shape learns from).
    value: Option<Range<usize>>,
    /// [`other_text`], found in the same pass.
    other: u64,
}

/// [`text_bytes`] and [`has_usage_object`] of one event, in one pass over it: every place
/// one of the three keys starts is visited in order, and each search's own rules (a
/// `content` value's bytes are not searched again; `find_iter` does not overlap matches)
/// are kept, so the answer is theirs (the tests compare them). Also the first counted
/// string value that no colon follows: from its opening quote to the end of its closing one
/// (what [`shape::EventShape`] learns from).
fn keys_and_value(data: &[u8]) -> KeysRead {
    let Some(searcher) = KEYS.as_ref() else {
        return KeysRead {
            text: text_bytes(data),
            has_usage: has_usage_object(data),
            value: None,
            other: other_text(data),
        };
    };
    let mut other = 0u64;
    // Where the next match of each of the other keys may start (`find_iter` per key).
    let mut other_from = [0usize; OTHER_KEY_NAMES.len()];
    let mut text = 0u64;
    let mut has_usage = false;
    let mut value = None;
    let counted = |len: usize, end: usize, value: &mut Option<Range<usize>>| {
        // Not a value a colon follows, nor one whose closing quote opens `"arguments"` or
        // `"usage"` (a match of that key ending at the quote, inside a value, would hide it:
        // matches of one key do not overlap). See `shape`.
        let tail = &data[end - 1..];
        if value.is_none()
            && after_colon(data, end).is_none()
            && !tail.starts_with(b"\"arguments\"")
            && !tail.starts_with(b"\"usage\"")
        {
            *value = Some(end - len - 2..end);
        }
        len as u64
    };
    // Where the next match of each kind may start.
    let (mut content_from, mut arguments_from, mut usage_from) = (0, 0, 0);
    let mut from = 0;
    while let Some(m) = searcher.find_in(data, aho_corasick::Span::from(from..data.len())) {
        let at = m.start();
        from = at + 1;
        match m.pattern().as_usize() {
            0 if at >= content_from => {
                content_from = m.end();
                let key = &data[..at];
                if key.ends_with(b"\"") || key.ends_with(b"\"reasoning_") {
                    if let Some((len, end)) = string_value(data, m.end()) {
                        text += counted(len, end, &mut value);
                        content_from = end;
                    }
                }
            }
            1 if at >= arguments_from => {
                arguments_from = m.end();
                if let Some((len, end)) = string_value(data, m.end()) {
                    text += counted(len, end, &mut value);
                }
            }
            2 if at >= usage_from => {
                usage_from = m.end();
                has_usage |= after_colon(data, m.end()).is_some_and(|i| data.get(i) == Some(&b'{'));
            }
            k @ 3.. if at >= other_from[k - 3] => {
                other_from[k - 3] = m.end();
                if let Some((len, _)) = string_value(data, m.end()) {
                    other += len as u64;
                }
            }
            _ => {}
        }
    }
    KeysRead {
        text,
        has_usage,
        value,
        other,
    }
}

/// Keys of generated output that [`keys_and_value`] counts apart: a `refusal`, a
/// `reasoning` (OpenRouter's), an audio reply's `transcript` and `data`, and content sent as
/// parts (`text`). A stream cut before its usage is charged for them too (SPEC §2: never
/// below what the provider bills). Counted only in an event where those keys counted
/// nothing and that is no usage event: nearly every stream has two, its first and its last.
const OTHER_KEY_NAMES: [&[u8]; 5] = [
    b"\"refusal\"",
    b"\"reasoning\"",
    b"\"transcript\"",
    b"\"data\"",
    b"\"text\"",
];

/// [`OTHER_KEY_NAMES`], each searched for on its own (where the CPU has no packed searcher,
/// and the reading the one pass is held to).
static OTHER_KEYS: LazyLock<[Finder<'static>; 5]> =
    LazyLock::new(|| OTHER_KEY_NAMES.map(Finder::new));

/// The raw lengths of the string values of [`OTHER_KEY_NAMES`] in one event.
fn other_text(data: &[u8]) -> u64 {
    let mut total = 0u64;
    for key in OTHER_KEYS.iter() {
        for at in key.find_iter(data) {
            if let Some((len, _)) = string_value(data, at + key.needle().len()) {
                total += len as u64;
            }
        }
    }
    total
}

/// Whether some `"usage"` key has an object value (OpenAI sends `"usage":null` on every
/// chunk once `include_usage` is set, so the key alone is not enough to parse).
fn has_usage_object(data: &[u8]) -> bool {
    USAGE_KEY
        .find_iter(data)
        .any(|at| after_colon(data, at + 7).is_some_and(|i| data.get(i) == Some(&b'{')))
}

/// Sum of raw string lengths of `content`, `reasoning_content` and `arguments` values.
fn text_bytes(data: &[u8]) -> u64 {
    let mut total = 0u64;
    let mut from = 0;
    while let Some(at) = CONTENT_KEY.find(&data[from..]).map(|i| from + i) {
        from = at + 8;
        let key = &data[..at];
        if key.ends_with(b"\"") || key.ends_with(b"\"reasoning_") {
            if let Some((len, end)) = string_value(data, from) {
                total += len as u64;
                from = end;
            }
        }
    }
    for at in ARGUMENTS_KEY.find_iter(data) {
        if let Some((len, _)) = string_value(data, at + 11) {
            total += len as u64;
        }
    }
    total
}

/// For a key ending at `key_end`, the raw length of its string value and the index after it.
fn string_value(data: &[u8], key_end: usize) -> Option<(usize, usize)> {
    let start = after_colon(data, key_end)?;
    if data.get(start) != Some(&b'"') {
        return None;
    }
    let mut i = start + 1;
    loop {
        let j = i + memchr::memchr2(b'"', b'\\', data.get(i..)?)?;
        if data[j] == b'"' {
            return Some((j - start - 1, j + 1));
        }
        i = j + 2;
    }
}

#[cfg(test)]
mod reference;
mod shape;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `chunks` and returns the concatenated forwarded bytes.
    fn run(parser: &mut SseUsageParser, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&parser.feed(chunk).bytes(chunk));
        }
        out.extend_from_slice(&parser.finish().bytes(&[]));
        out
    }

    fn run_split(input: &[u8], cuts: &[usize], strip: bool) -> (SseUsageParser, Vec<u8>) {
        let mut parser = SseUsageParser::new(strip);
        let mut chunks = Vec::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            chunks.push(&input[prev..c]);
            prev = c;
        }
        let out = run(&mut parser, &chunks);
        (parser, out)
    }

    fn summary(p: &SseUsageParser) -> (Option<Usage>, u64, bool) {
        (p.usage(), p.content_bytes(), p.done())
    }

    fn usage(prompt_tokens: u64, completion_tokens: u64) -> Option<Usage> {
        Some(Usage::new(prompt_tokens, completion_tokens))
    }

    const USAGE_EVENT: &str = "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"total_tokens\":19,\"prompt_tokens_details\":{\"cached_tokens\":0}}}";

    fn chunk_event(delta: &str, finish: &str) -> String {
        format!(
            "data: {{\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}],\"usage\":null}}"
        )
    }

    /// A recorded-style OpenAI stream; returns (stream, stream without the usage block).
    fn recorded_stream(eol: &str) -> (String, String) {
        let lines: Vec<String> = vec![
            ": OPENROUTER PROCESSING".into(),
            String::new(),
            chunk_event(r#"{"role":"assistant","content":""}"#, "null"),
            String::new(),
            chunk_event(r#"{"content":"Hello"}"#, "null"),
            String::new(),
            ": keep-alive".into(),
            String::new(),
            chunk_event(r#"{"content":", \"wor"}"#, "null"),
            String::new(),
            "event: message".into(),
            "id: 4".into(),
            chunk_event(r#"{"content":"ld\"!\n"}"#, "null"),
            String::new(),
            chunk_event(r#"{"content":"Bye"}"#, "null"),
            String::new(),
            chunk_event("{}", "\"stop\""),
            String::new(),
        ];
        let mut before = String::new();
        for l in &lines {
            before.push_str(l);
            before.push_str(eol);
        }
        let usage_block = format!("{USAGE_EVENT}{eol}{eol}");
        let after = format!("data: [DONE]{eol}{eol}");
        (
            format!("{before}{usage_block}{after}"),
            format!("{before}{after}"),
        )
    }

    /// "" + "Hello" + ", \"wor" + "ld\"!\n" + "Bye", escapes counted raw.
    const RECORDED_CONTENT: u64 = 5 + 7 + 7 + 3;

    #[test]
    fn usage_from_chat_json() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi","usage":5}}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"completion_tokens_details":{"reasoning_tokens":0}}}"#;
        assert_eq!(usage_from_json(body), usage(9, 12));
    }

    #[test]
    fn usage_from_embeddings_json() {
        let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(usage_from_json(body), usage(8, 0));
        assert_eq!(
            usage_from_json(br#"{"usage":{"total_tokens":5}}"#),
            usage(5, 0)
        );
        assert_eq!(
            usage_from_json(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#),
            usage(3, 4)
        );
    }

    #[test]
    fn usage_from_json_absent_or_malformed() {
        assert_eq!(usage_from_json(b""), None);
        assert_eq!(usage_from_json(b"not json"), None);
        assert_eq!(usage_from_json(br#"{"usage":{"prompt_tokens":1"#), None);
        assert_eq!(usage_from_json(br#"{"id":"x"}"#), None);
        assert_eq!(usage_from_json(br#"{"usage":null}"#), None);
        assert_eq!(usage_from_json(br#"{"usage":{}}"#), None);
        assert_eq!(usage_from_json(br#"{"usage":{"prompt_tokens":-1}}"#), None);
        assert_eq!(usage_from_json(br#"[1,2]"#), None);
    }

    #[test]
    fn sse_with_each_line_ending() {
        for eol in ["\n", "\r\n", "\r"] {
            let (input, _) = recorded_stream(eol);
            let (p, out) = run_split(input.as_bytes(), &[], false);
            assert_eq!(
                summary(&p),
                (usage(12, 7), RECORDED_CONTENT, true),
                "{eol:?}"
            );
            assert_eq!(out, input.as_bytes());
        }
    }

    #[test]
    fn comments_and_other_fields_are_ignored() {
        let input = b":hi\nevent: x\nid: 1\nretry: 10\ndata:{\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
        let (p, _) = run_split(input, &[], false);
        assert_eq!(p.usage(), usage(1, 2));
        let (p, _) = run_split(b": data: {\"usage\":{\"prompt_tokens\":1}}\n\n", &[], false);
        assert_eq!(p.usage(), None);
    }

    #[test]
    fn missing_done_and_trailing_blank_line() {
        let input = USAGE_EVENT.to_string();
        let (p, out) = run_split(input.as_bytes(), &[10], false);
        assert_eq!(summary(&p), (usage(12, 7), 0, false));
        assert_eq!(out, input.as_bytes());
        let (p, out) = run_split(input.as_bytes(), &[10], true);
        assert_eq!(p.usage(), usage(12, 7));
        assert!(out.is_empty());
        let (p, out) = run_split(b"data: [DONE]", &[], true);
        assert!(p.done());
        assert_eq!(out, b"data: [DONE]");
    }

    #[test]
    fn usage_on_a_content_chunk_is_kept_and_last_wins() {
        let input = b"data: {\"choices\":[{\"delta\":{\"content\":\"ab\"}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"c\"}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        let (p, out) = run_split(input, &[], true);
        assert_eq!(summary(&p), (usage(3, 2), 3, true));
        assert_eq!(out, input);
    }

    #[test]
    fn usage_null_is_not_usage() {
        let input = format!("{}\n\n", chunk_event(r#"{"content":"x"}"#, "null"));
        let (p, out) = run_split(input.as_bytes(), &[], true);
        assert_eq!(summary(&p), (None, 1, false));
        assert_eq!(out, input.as_bytes());
    }

    #[test]
    fn reasoning_and_tool_arguments_count_as_text() {
        let input = br#"data: {"choices":[{"delta":{"reasoning_content":"abcd","tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}}]}}]}

"#;
        let (p, _) = run_split(input, &[], false);
        assert_eq!(p.content_bytes(), 4 + 9);
    }

    /// A cut stream is charged the output delivered in any form a chat stream carries it: a
    /// refusal, OpenRouter's `reasoning`, an audio reply (transcript and data) and content
    /// as parts count as content does (a black-box audit saw 500 bytes of each charged as
    /// one token). However the stream is split, and however many events repeat.
    #[test]
    fn refusals_audio_reasoning_and_content_parts_count_as_text() {
        let role = chunk_event(r#"{"role":"assistant","content":""}"#, "null");
        let cases: [(&str, u64); 5] = [
            (r#"{"content":null,"refusal":"I can't"}"#, 7),
            (r#"{"reasoning":"think"}"#, 5),
            (
                r#"{"audio":{"id":"a1","data":"UklGRg==","transcript":"hi"}}"#,
                8 + 2,
            ),
            (r#"{"content":[{"type":"text","text":"abc"}]}"#, 3),
            // With content in the same event, the other keys are not read again.
            (r#"{"content":"ab","refusal":"xyz"}"#, 2),
        ];
        for (delta, bytes) in cases {
            let event = chunk_event(delta, "null");
            let input = format!("{role}\n\n{event}\n\n{event}\n\n{event}\n\n");
            for cut in [0, 40, 200, 333] {
                let cuts: Vec<usize> = (cut > 0 && cut < input.len())
                    .then_some(cut)
                    .into_iter()
                    .collect();
                let (p, out) = run_split(input.as_bytes(), &cuts, true);
                assert_eq!(p.content_bytes(), 3 * bytes, "{delta} cut at {cut}");
                assert_eq!(out, input.as_bytes());
            }
        }
    }

    #[test]
    fn multi_line_data_is_joined() {
        let input = b"data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":4,\"completion_tokens\":5}}\n\n";
        let (p, out) = run_split(input, &[], true);
        assert_eq!(p.usage(), usage(4, 5));
        assert!(out.is_empty());
    }

    #[test]
    fn forward_shapes_when_stripping() {
        let mut p = SseUsageParser::new(true);
        assert_eq!(p.feed(b"data: 1\n\n"), Forward::Unchanged);
        assert_eq!(p.feed(b"data: 2\n\ndata: 3"), Forward::Range(0..9));
        assert_eq!(p.feed(b"\n"), Forward::Nothing);
        assert_eq!(p.feed(b"\n"), Forward::Owned(b"data: 3\n\n".to_vec()));
        let usage_block = format!("{USAGE_EVENT}\n\n");
        let chunk = format!("data: 4\n\n{usage_block}data: [DONE]\n\n");
        assert_eq!(
            p.feed(chunk.as_bytes()),
            Forward::Without(9..9 + usage_block.len())
        );
        let chunk = format!("data: 4\n\n{usage_block}data: 5\n\n{usage_block}data: [DONE]\n\n");
        assert_eq!(
            p.feed(chunk.as_bytes()),
            Forward::Owned(b"data: 4\n\ndata: 5\n\ndata: [DONE]\n\n".to_vec())
        );
        let chunk = format!("data: 4\n\n{usage_block}data: 5");
        assert_eq!(p.feed(chunk.as_bytes()), Forward::Range(0..9));
        assert_eq!(p.feed(b"\n\n"), Forward::Owned(b"data: 5\n\n".to_vec()));
        assert_eq!(p.finish(), Forward::Nothing);
        assert_eq!(p.usage(), usage(12, 7));

        let mut p = SseUsageParser::new(true);
        let chunk = format!("data: 4\n\n{usage_block}");
        assert_eq!(p.feed(chunk.as_bytes()), Forward::Range(0..9));
        assert_eq!(p.feed(usage_block.as_bytes()), Forward::Nothing);
        assert_eq!(p.finish(), Forward::Nothing);
    }

    #[test]
    fn split_crlf_after_stripped_event_drops_the_lf() {
        let input = format!("{USAGE_EVENT}\r\n\r\ndata: [DONE]\r\n\r\n");
        let cut = USAGE_EVENT.len() + 3;
        let (p, out) = run_split(input.as_bytes(), &[cut], true);
        assert_eq!(out, b"data: [DONE]\r\n\r\n");
        assert!(p.done());
    }

    #[test]
    fn not_stripping_is_always_unchanged() {
        let (input, _) = recorded_stream("\r\n");
        let mut p = SseUsageParser::new(false);
        for chunk in input.as_bytes().chunks(7) {
            assert_eq!(p.feed(chunk), Forward::Unchanged);
        }
        assert_eq!(p.feed(b""), Forward::Unchanged);
        assert_eq!(p.finish(), Forward::Nothing);
    }

    #[test]
    fn overlong_event_is_forwarded_not_analysed() {
        let big = "x".repeat(MAX_EVENT_BYTES);
        let input = format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1}},\"pad\":\"{big}\"}}\n\ndata: [DONE]\n\n"
        );
        for cuts in [&[][..], &[100, 600_000][..]] {
            let (p, out) = run_split(input.as_bytes(), cuts, true);
            assert_eq!(summary(&p), (None, 0, true));
            assert!(out == input.as_bytes());
        }
    }

    #[test]
    fn every_single_split_point_agrees() {
        for eol in ["\n", "\r\n", "\r"] {
            let (input, stripped) = recorded_stream(eol);
            let input = input.as_bytes();
            let expected = (usage(12, 7), RECORDED_CONTENT, true);
            for cut in 0..=input.len() {
                let (p, out) = run_split(input, &[cut], false);
                assert_eq!(summary(&p), expected, "eol {eol:?} cut {cut}");
                assert_eq!(out, input, "eol {eol:?} cut {cut}");
                let (p, out) = run_split(input, &[cut], true);
                assert_eq!(summary(&p), expected, "eol {eol:?} cut {cut}");
                assert_eq!(out, stripped.as_bytes(), "eol {eol:?} cut {cut}");
            }
            let cuts: Vec<usize> = (1..input.len()).collect();
            let (p, out) = run_split(input, &cuts, true);
            assert_eq!(summary(&p), expected, "eol {eol:?} 1-byte chunks");
            assert_eq!(out, stripped.as_bytes(), "eol {eol:?} 1-byte chunks");
        }
    }

    fn cuts_for(len: usize, raw: Vec<usize>) -> Vec<usize> {
        let mut cuts: Vec<usize> = raw.into_iter().map(|c| c % (len + 1)).collect();
        cuts.sort_unstable();
        cuts
    }

    proptest! {
        #[test]
        fn recorded_stream_any_split(
            eol in prop::sample::select(vec!["\n", "\r\n", "\r"]),
            raw in prop::collection::vec(any::<usize>(), 0..40),
            one_byte_run in 0usize..2,
        ) {
            let (input, stripped) = recorded_stream(eol);
            let input = input.as_bytes();
            let mut cuts = cuts_for(input.len(), raw);
            // Some runs also cut a stretch into 1-byte chunks.
            if one_byte_run == 1 && !cuts.is_empty() {
                let from = cuts[0];
                cuts.extend(from..(from + 64).min(input.len()));
                cuts.sort_unstable();
            }
            let expected = (usage(12, 7), RECORDED_CONTENT, true);
            let (p, out) = run_split(input, &cuts, false);
            prop_assert_eq!(summary(&p), expected);
            prop_assert_eq!(&out[..], input);
            let (p, out) = run_split(input, &cuts, true);
            prop_assert_eq!(summary(&p), expected);
            prop_assert_eq!(&out[..], stripped.as_bytes());
        }

        #[test]
        fn arbitrary_input_any_split(
            parts in prop::collection::vec(prop::sample::select(vec![
                "data: ", "data:", "\n", "\r", "\r\n", ":c", "id: 1", "{\"choices\":[]",
                ",\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}", "\"usage\":null",
                "[DONE]", "{\"content\":\"ab\\\"c\"}", "x",
            ]), 0..40),
            raw in prop::collection::vec(any::<usize>(), 0..20),
        ) {
            let input = parts.concat();
            let input = input.as_bytes();
            let cuts = cuts_for(input.len(), raw);
            for strip in [false, true] {
                let (whole, whole_out) = run_split(input, &[], strip);
                let (split, split_out) = run_split(input, &cuts, strip);
                prop_assert_eq!(summary(&whole), summary(&split));
                prop_assert_eq!(&whole_out, &split_out);
                if !strip {
                    prop_assert_eq!(&whole_out[..], input);
                }
            }
        }
    }

    /// Feeds `input`, cut at `cuts`, to this parser and to the one it replaced: both forward
    /// the same bytes and read the same usage, text bytes and `[DONE]`.
    fn assert_reads_as_the_old_parser(
        input: &[u8],
        cuts: &[usize],
        strip: bool,
    ) -> Result<(), TestCaseError> {
        let (new, new_out) = run_split(input, cuts, strip);
        let mut old = reference::OldParser::new(strip);
        let mut old_out = Vec::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            old_out.extend_from_slice(&old.feed(&input[prev..c]));
            prev = c;
        }
        old_out.extend_from_slice(&old.finish());
        prop_assert_eq!(
            summary(&new),
            (old.usage(), old.content_bytes(), old.done()),
            "{:?} cut at {:?}",
            String::from_utf8_lossy(input),
            cuts
        );
        prop_assert_eq!(
            new_out,
            old_out,
            "{:?} cut at {:?}",
            String::from_utf8_lossy(input),
            cuts
        );
        Ok(())
    }

    proptest! {
        /// Streams of SSE pieces (several `data:` lines to an event, other fields, comments,
        /// each line end, usage events, `[DONE]`), cut anywhere: read in place, they read as
        /// the copying parser read them.
        #[test]
        fn reads_events_in_place_as_the_old_parser_did(
            parts in prop::collection::vec(prop::sample::select(vec![
                "data: ", "data:", "data", "\n", "\r", "\r\n", "\n\n", ":c", "id: 1", "event: e",
                "{\"choices\":[]", ",\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}",
                "\"usage\":null", "[DONE]", "{\"content\":\"ab\\\"c\"}", "x", " ",
                "{\"choices\":[],\"usage\":{\"prompt_tokens\":4}}",
                "{\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}",
            ]), 0..40),
            raw in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let input = parts.concat();
            let input = input.as_bytes();
            let cuts = cuts_for(input.len(), raw);
            for strip in [false, true] {
                assert_reads_as_the_old_parser(input, &cuts, strip)?;
                assert_reads_as_the_old_parser(input, &[], strip)?;
            }
        }

        /// Bytes from SSE's alphabet and any other: the same reading as the old parser.
        #[test]
        fn reads_any_bytes_as_the_old_parser_did(
            input in prop::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), Just(b':'), Just(b' '), Just(b'd'),
                            Just(b'a'), Just(b't'), any::<u8>()],
                0..200),
            raw in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let cuts = cuts_for(input.len(), raw);
            for strip in [false, true] {
                assert_reads_as_the_old_parser(&input, &cuts, strip)?;
            }
        }

        /// The recorded stream with any line ends, cut anywhere.
        #[test]
        fn reads_a_recorded_stream_as_the_old_parser_did(
            eol in prop::sample::select(vec!["\n", "\r\n", "\r"]),
            raw in prop::collection::vec(any::<usize>(), 0..20),
        ) {
            let (input, _) = recorded_stream(eol);
            let input = input.as_bytes();
            let cuts = cuts_for(input.len(), raw);
            for strip in [false, true] {
                assert_reads_as_the_old_parser(input, &cuts, strip)?;
            }
        }
    }

    #[test]
    fn trailing_usage_fast_path_agrees_with_the_full_parse() {
        let cases: [&[u8]; 7] = [
            br#"{"id":"x","choices":[{"message":{"content":"a \"usage\": {\"prompt_tokens\": 99}"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
            br#"{"usage":{"prompt_tokens":3,"completion_tokens":4},"id":"x"}"#,
            br#"{"id":"x","meta":{"usage":{"prompt_tokens":9}}}"#,
            br#"{"id":"x","usage":null}"#,
            b"{\"id\":\"x\",\n  \"usage\" : {\"prompt_tokens\":1,\"total_tokens\":1}\n}\n",
            br#"{"data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":5,"total_tokens":5}}"#,
            br#"{"id":"x","usage":{"prompt_tokens":3,"#,
        ];
        for body in cases {
            let full = serde_json::from_slice::<UsageBody>(body)
                .ok()
                .and_then(|b| b.usage)
                .and_then(RawUsage::into_usage);
            assert_eq!(
                usage_from_json(body),
                full,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(usage_from_json(cases[0]), Some(Usage::new(3, 4)));
        assert!(trailing_usage(cases[0]).is_some(), "fast path taken");
        assert!(
            trailing_usage(cases[2]).is_none(),
            "nested usage falls back"
        );
        assert_eq!(usage_from_json(cases[2]), None);
    }

    /// What serde reads from the start of `value`, and where it stopped.
    fn serde_usage(value: &[u8]) -> Option<(Option<RawUsage>, usize)> {
        let mut stream =
            serde_json::Deserializer::from_slice(value).into_iter::<Option<RawUsage>>();
        let usage = stream.next()?.ok()?;
        Some((usage, stream.byte_offset()))
    }

    #[test]
    fn the_flat_usage_scanner_reads_real_usage_objects_as_serde_does() {
        let taken: [&[u8]; 6] = [
            br#"{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}"#,
            br#"{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#,
            br#"{"input_tokens":7,"output_tokens":2,"input_tokens_details":{"cached_tokens":null},"output_tokens_details":{"reasoning_tokens":1}}"#,
            b"{ \"prompt_tokens\" : 0 ,\n\t\"total_tokens\":18446744073709551615 }",
            br#"null"#,
            br#"{}"#,
        ];
        for v in taken {
            let fast = flat::usage(v);
            assert!(fast.is_some(), "not taken: {}", String::from_utf8_lossy(v));
            assert_eq!(fast, serde_usage(v), "{}", String::from_utf8_lossy(v));
        }
        // Given up on (serde decides): each is something the scanner does not read.
        let refused: [&[u8]; 12] = [
            br#"{"prompt_tokens":1,"input_tokens":2}"#,
            br#"{"prompt_tokens":1,"prompt_tokens":1}"#,
            br#"{"prompt_tokens":1.0}"#,
            br#"{"prompt_tokens":-1}"#,
            br#"{"prompt_tokens":01}"#,
            br#"{"prompt_tokens":18446744073709551616}"#,
            br#"{"prompt_tokens":"5"}"#,
            br#"{"prompt\u005ftokens":5}"#,
            br#"{"prompt_tokens":5,}"#,
            br#"{"x":[1]}"#,
            br#"{"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":2}}"#,
            br#"{"x":{"y":{}}}"#,
        ];
        for v in refused {
            assert_eq!(flat::usage(v), None, "{}", String::from_utf8_lossy(v));
        }
    }

    proptest! {
        /// Usage-shaped objects from a grammar with the tricky pieces (aliases, duplicates,
        /// nulls, leading zeros, floats, big numbers, spaces, nested objects, escapes): where
        /// the scanner reads one, serde reads the same thing and stops at the same byte.
        #[test]
        fn the_flat_usage_scanner_never_disagrees_with_serde(
            members in proptest::collection::vec((0usize..9, 0usize..12, 0usize..4), 0..7),
            tail in 0usize..4,
        ) {
            const KEYS: [&str; 9] = ["prompt_tokens", "input_tokens", "completion_tokens",
                "output_tokens", "total_tokens", "prompt_tokens_details", "input_tokens_details",
                "completion_tokens_details", "prompt\\u005ftokens"];
            const VALUES: [&str; 12] = ["0", "12", "007", "1.5", "-3", "null", "18446744073709551616",
                "{\"cached_tokens\":4}", "{\"cached_tokens\":null,\"audio_tokens\":1}", "{}",
                "\"9\"", "{\"cached_tokens\":{}}"];
            const SPACE: [&str; 4] = ["", " ", "\n\t", "\r"];
            let body: Vec<String> = members
                .iter()
                .map(|&(k, v, w)| format!("{w}\"{}\"{w}:{w}{}{w}", KEYS[k], VALUES[v], w = SPACE[w]))
                .collect();
            let text = format!("{{{}}}{}", body.join(","), ["", "}", " }", ",x"][tail]);
            let v = text.as_bytes();
            if let Some(fast) = flat::usage(v) {
                prop_assert_eq!(Some(fast), serde_usage(v), "{}", text);
            }
        }
    }

    /// Usage values the scanner took or refused before it was rewritten, and edges of its
    /// grammar: the rewrite gives the same answer (value and bytes taken, or `None`) on each.
    #[test]
    fn the_flat_usage_scanner_reads_as_it_did_before() {
        let cases: [&[u8]; 38] = [
            br#"{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}"#,
            br#"{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#,
            br#"{"input_tokens":7,"output_tokens":2,"input_tokens_details":{"cached_tokens":null},"output_tokens_details":{"reasoning_tokens":1}}"#,
            b"{ \"prompt_tokens\" : 0 ,\n\t\"total_tokens\":18446744073709551615 }",
            b" \r\n null",
            b"null}",
            b"null,",
            b"nullx",
            b"nul",
            b"",
            b"   ",
            b"{",
            b"{}",
            b"{ }x",
            br#"{"prompt_tokens":1,"input_tokens":2}"#,
            br#"{"prompt_tokens":1,"prompt_tokens":1}"#,
            br#"{"prompt_tokens":null,"prompt_tokens":1}"#,
            br#"{"prompt_tokens":1.0}"#,
            br#"{"prompt_tokens":1e3}"#,
            br#"{"prompt_tokens":-1}"#,
            br#"{"prompt_tokens":01}"#,
            br#"{"prompt_tokens":0}"#,
            br#"{"prompt_tokens":18446744073709551616}"#,
            br#"{"prompt_tokens":99999999999999999999}"#,
            br#"{"prompt_tokens":"5"}"#,
            br#"{"prompt\u005ftokens":5}"#,
            br#"{"prompt_tokensX":5,"prompt_token":6,"Prompt_tokens":[1]}"#,
            br#"{"prompt_tokens":5,}"#,
            br#"{"prompt_tokens":5 "total_tokens":1}"#,
            br#"{"prompt_tokens" 5}"#,
            br#"{"x":[1]}"#,
            br#"{"x":{"a":1,"a":2,"cached_tokens":null}}"#,
            br#"{"x":{"cached_tokens":1,"cached_tokens":2}}"#,
            br#"{"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":2}}"#,
            br#"{"prompt_tokens_details":null,"input_tokens_details":{"cached_tokens":4}}"#,
            br#"{"prompt_tokens_details":5}"#,
            br#"{"x":{"y":{}}}"#,
            "{\"\u{e9}\":1,\"a\x01\":2}".as_bytes(),
        ];
        for v in cases {
            assert_eq!(
                flat::usage(v),
                flat::usage_before(v),
                "{}",
                String::from_utf8_lossy(v)
            );
        }
    }

    proptest! {
        /// Usage-shaped values from a grammar of the pieces each reader decides on (the keys
        /// serde maps, near misses of them, escaped and non-ASCII keys, counts at every edge,
        /// null and near-nulls, flat and nested objects, other JSON values, JSON and non-JSON
        /// space, a broken separator or tail): the rewritten scanner gives exactly the answer
        /// the old one gave, refusals included, so what it refuses still goes to serde.
        #[test]
        fn the_flat_usage_scanner_agrees_with_the_one_before(
            members in proptest::collection::vec((0usize..16, 0usize..24, 0usize..6, 0usize..4), 0..7),
            head in 0usize..4,
            tail in 0usize..5,
        ) {
            const KEYS: [&str; 16] = ["prompt_tokens", "input_tokens", "completion_tokens",
                "output_tokens", "total_tokens", "prompt_tokens_details", "input_tokens_details",
                "completion_tokens_details", "prompt\\u005ftokens", "prompt_tokensX",
                "prompt_token", "cached_tokens", "", "\u{e9}", "a\u{1}", "total_tokens\\\""];
            const VALUES: [&str; 24] = ["0", "12", "007", "1.5", "-3", "null", "nul", "nullx",
                "18446744073709551615", "18446744073709551616", "1e3", "{\"cached_tokens\":4}",
                "{\"cached_tokens\":null,\"audio_tokens\":1}", "{}", "{ }", "\"9\"",
                "{\"cached_tokens\":{}}", "{\"cached_tokens\":1,\"cached_tokens\":1}",
                "{\"a\":1,\"a\":2}", "{\"a\":1,}", "[1]", "true", "", "{\"cached_tokens\" 1}"];
            const SPACE: [&str; 6] = ["", " ", "\n\t", "\r", "\u{c}", "  "];
            const SEP: [&str; 4] = [",", ",", " , ", ";"];
            let mut text = ["", " ", "\n", "x"][head].to_string();
            text.push('{');
            for (n, &(k, v, w, sep)) in members.iter().enumerate() {
                if n > 0 {
                    text.push_str(SEP[sep]);
                }
                text.push_str(&format!("{w}\"{}\"{w}:{w}{}{w}", KEYS[k], VALUES[v], w = SPACE[w]));
            }
            text.push_str(["}", "} ", "}}", "", ",}"][tail]);
            let v = text.as_bytes();
            prop_assert_eq!(flat::usage(v), flat::usage_before(v), "{}", text);
        }

        /// Real usage objects with one to three bytes replaced, inserted or removed: the
        /// rewritten scanner gives exactly the answer the old one gave.
        #[test]
        fn the_flat_usage_scanner_agrees_with_the_one_before_on_damaged_objects(
            which in 0usize..4,
            edits in proptest::collection::vec((0usize..400, 0usize..3, prop_oneof![
                Just(b'"'), Just(b'\\'), Just(b'{'), Just(b'}'), Just(b'['), Just(b','),
                Just(b':'), Just(b' '), Just(b'\t'), Just(b'0'), Just(b'9'), Just(b'n'),
                Just(b'_'), Just(b'.'), Just(b'-'), any::<u8>()]), 1..4),
        ) {
            const REAL: [&[u8]; 4] = [
                br#"{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}"#,
                br#"{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}}"#,
                br#"{"input_tokens":7,"output_tokens":2,"input_tokens_details":{"cached_tokens":null},"output_tokens_details":{"reasoning_tokens":1}}"#,
                b" null ",
            ];
            let mut v = REAL[which].to_vec();
            for (at, op, byte) in edits {
                let at = at % (v.len() + 1);
                match op {
                    0 if at < v.len() => v[at] = byte,
                    1 | 0 => v.insert(at, byte),
                    _ if at < v.len() => {
                        v.remove(at);
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(flat::usage(&v), flat::usage_before(&v), "{}", String::from_utf8_lossy(&v));
        }
    }

    #[test]
    fn the_chunk_scanner_reads_real_chunks_as_serde_does() {
        let taken: [&[u8]; 9] = [
            br#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"up-paid-a","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#,
            br#"{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_f33640a400","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"Xy3"}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"choices":[{"index":0,"delta":{"content":"a \"usage\": {\"x\":1} \\n \u00e9 \/"},"logprobs":null,"finish_reason":null}]}"#,
            br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t","type":"function","function":{"name":"f","arguments":"{\"a\":[1,2.5e-3,-0,true,false,null]}"}}]}}],"usage":null}"#,
            b"{ \"choices\" :\n[ ] ,\t\"usage\"\r: { \"prompt_tokens\" : 3 } , \"n\" : -12.5E+2 }",
            br#"{"choices":null,"usage":{"input_tokens":4,"output_tokens":1}}"#,
            br#"{"id":"x","usage":{"prompt_tokens":2},"extra":{"a":{"b":[[],[{}],"\u0000"]}}}"#,
            br#"{"id":"x","choices":[1]}"#,
            br#"{}"#,
        ];
        for v in taken {
            let fast = flat::chunk(v);
            assert!(fast.is_some(), "not taken: {}", String::from_utf8_lossy(v));
            assert_eq!(fast, serde_chunk(v), "{}", String::from_utf8_lossy(v));
        }
        assert_eq!(
            flat::chunk(taken[0]),
            Some((
                Some(RawUsage {
                    prompt_tokens: Some(12),
                    completion_tokens: Some(5),
                    total_tokens: Some(17),
                    ..RawUsage::default()
                }),
                Some(true)
            ))
        );
        // Given up on (serde decides, and refuses most of them).
        let deep = format!("{{\"x\":{}1{}}}", "[".repeat(40), "]".repeat(40));
        let refused: [&[u8]; 16] = [
            br#"[{"prompt_tokens":1},[]]"#,
            br#"{"usage":{"prompt_tokens":1},"usage":null}"#,
            br#"{"choices":[],"choices":[]}"#,
            br#"{"us\u0061ge":{"prompt_tokens":1},"choices":[]}"#,
            br#"{"choices":"[]","usage":{"prompt_tokens":1}}"#,
            br#"{"usage":{"prompt_tokens":1}} x"#,
            br#"{"usage":{"prompt_tokens":1}"#,
            b"{\"id\":\"a\x01b\",\"usage\":{\"prompt_tokens\":1}}",
            br#"{"id":"a\qb","usage":{"prompt_tokens":1}}"#,
            br#"{"id":"\u12G4","usage":{"prompt_tokens":1}}"#,
            br#"{"n":01,"usage":{"prompt_tokens":1}}"#,
            br#"{"n":1.,"usage":{"prompt_tokens":1}}"#,
            br#"{"n":tru,"usage":{"prompt_tokens":1}}"#,
            br#"{"a":[1,],"usage":{"prompt_tokens":1}}"#,
            br#"{"usage":[1,2,3],"choices":[]}"#,
            deep.as_bytes(),
        ];
        for v in refused {
            assert_eq!(flat::chunk(v), None, "{}", String::from_utf8_lossy(v));
        }
    }

    proptest! {
        /// Chunk-shaped objects from a grammar with the tricky pieces (escaped strings and
        /// keys, whitespace, nested objects and arrays, numbers, `usage` in any place, null or
        /// repeated, `choices` null, empty or not, malformed values, trailing bytes): where the
        /// chunk scanner reads one, serde reads the same.
        #[test]
        fn the_chunk_scanner_never_disagrees_with_serde(
            members in proptest::collection::vec((0usize..8, 0usize..26, 0usize..4), 0..7),
            tail in 0usize..5,
        ) {
            const KEYS: [&str; 8] = ["id", "usage", "choices", "model", "us\\u0061ge", "x y",
                "\u{e9}", "obfuscation"];
            const VALUES: [&str; 26] = ["null", "[]", "[1,2]", "[{}]", "[ {\"delta\":{\"content\":\"x\"}} ]",
                "[1,]", "\"a\\\"b\"", "\"\\u00e9\\n\\/\"", "\"\\q\"", "\"a\u{1}b\"", "\"\\u12\"",
                "{\"a\":[true,false,null]}", "-0.5e-7", "01", "1.", "tru", "0", "-", "1e5",
                "{\"prompt_tokens\":12,\"completion_tokens\":5}", "{\"prompt_tokens\":1.5}",
                "{\"input_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":1}}", "{}",
                "{\"x\":{\"y\":{}}}", "\"\u{e9}\"", "[[],[[]]]"];
            const SPACE: [&str; 4] = ["", " ", "\n\t", "\r"];
            let body: Vec<String> = members
                .iter()
                .map(|&(k, v, w)| format!("{w}\"{}\"{w}:{w}{}{w}", KEYS[k], VALUES[v], w = SPACE[w]))
                .collect();
            let text = format!("{{{}}}{}", body.join(","), ["", " ", "}", ",", "x"][tail]);
            let v = text.as_bytes();
            if let Some(fast) = flat::chunk(v) {
                prop_assert_eq!(Some(fast), serde_chunk(v), "{}", text);
            }
        }

        /// A real usage chunk with one byte replaced, inserted or removed: where the chunk
        /// scanner still reads it, serde reads the same.
        #[test]
        fn the_chunk_scanner_agrees_on_damaged_chunks(
            at in 0usize..400,
            op in 0usize..3,
            byte in prop_oneof![Just(b'"'), Just(b'\\'), Just(b'{'), Just(b'}'), Just(b'['),
                                Just(b']'), Just(b','), Just(b':'), Just(b' '), Just(b'0'),
                                Just(b'n'), Just(b'u'), Just(b'e'), Just(b'.'), Just(b'-'), any::<u8>()],
        ) {
            let real = br#"{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"obfuscation":"a\"b\u00e9"}"#;
            let mut v = real.to_vec();
            let at = at % v.len();
            match op {
                0 => v[at] = byte,
                1 => v.insert(at, byte),
                _ => {
                    v.remove(at);
                }
            }
            if let Some(fast) = flat::chunk(&v) {
                prop_assert_eq!(Some(fast), serde_chunk(&v), "{}", String::from_utf8_lossy(&v));
            }
        }
    }

    #[test]
    fn the_one_pass_key_search_reads_real_events_as_the_single_searches_do() {
        let events: [&[u8]; 7] = [
            br#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"up-paid-a","choices":[{"index":0,"delta":{"content":"ok "},"finish_reason":null}]}"#,
            br#"{"id":"c","choices":[{"index":0,"delta":{"reasoning_content":"hm \"content\": \"x\"","content":null}}],"usage":null}"#,
            br#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}}]}}]}"#,
            br#"{"id":"c","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#,
            b"{\"content\" :\n \"a\\\\\" , \"usage\" : {}}",
            br#"{"content":"a","content":"bc","x":"content","arguments":"d"}"#,
            br#"{"usage":null}"#,
        ];
        let want = [3, 21, 9, 0, 3, 4, 0];
        for (e, n) in events.iter().zip(want) {
            assert_eq!(
                keys(e),
                (text_bytes(e), has_usage_object(e)),
                "{}",
                String::from_utf8_lossy(e)
            );
            assert_eq!(keys(e).0, n, "{}", String::from_utf8_lossy(e));
            assert_eq!(keys_and_value(e).other, 0, "{}", String::from_utf8_lossy(e));
        }
        assert!(keys(events[3]).1 && keys(events[4]).1 && !keys(events[6]).1);
    }

    #[test]
    fn the_one_pass_key_search_counts_the_other_keys_as_their_own_searches_do() {
        let events: [(&[u8], u64); 6] = [
            (br#"{"choices":[{"delta":{"refusal":"no"}}]}"#, 2),
            (
                br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
                0,
            ),
            (
                br#"{"delta":{"reasoning":"hm","reasoning_content":null}}"#,
                2,
            ),
            (
                br#"{"audio":{"transcript":"hi \"you\"","data":"AAAA"}}"#,
                14,
            ),
            (
                br#"{"content":[{"type":"text","text":"a"},{"type":"text","text":"bc"}]}"#,
                3,
            ),
            (
                br#"{"text":"x","text":"yz","x":"text","refusal""text":"q"}"#,
                4,
            ),
        ];
        for (e, n) in events {
            let read = keys_and_value(e);
            assert_eq!(read.other, other_text(e), "{}", String::from_utf8_lossy(e));
            assert_eq!(read.other, n, "{}", String::from_utf8_lossy(e));
        }
    }

    proptest! {
        /// Events made of the keys' pieces (overlapping keys, keys inside values, escapes,
        /// spaces, short and long): one pass reads what the three searches read.
        #[test]
        fn the_one_pass_key_search_agrees_with_the_single_searches(
            pieces in proptest::collection::vec(0usize..21, 0..40),
        ) {
            const PIECES: [&str; 21] = ["content\"", "\"reasoning_", "\"arguments\"", "\"usage\"",
                ":", " ", "\"", "\\", "{", "x", "\"ab\"", "usage\"", "arguments\"", "\"content",
                "\n", "\"\\\"q\\\"\"", "\"refusal\"", "\"text\"", "\"reasoning\"", "\"te", "xt\""];
            let text: String = pieces.iter().map(|&i| PIECES[i]).collect();
            let e = text.as_bytes();
            prop_assert_eq!(keys(e), (text_bytes(e), has_usage_object(e)), "{}", text);
            prop_assert_eq!(keys_and_value(e).other, other_text(e), "{}", text);
        }
    }

    /// One chat chunk event around `value` (the text as it is written in JSON).
    fn shaped_event(key: &str, value: &str, after: &str, eol: &str) -> String {
        format!(
            "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"{key}\":\"{value}\"{after}}}}}]}}{eol}{eol}"
        )
    }

    #[test]
    fn events_shaped_like_the_last_are_read_at_a_glance_and_read_the_same() {
        for eol in ["\n", "\r\n"] {
            let mut input = String::new();
            // A raw tab is no JSON, but the shape reads it as the full reading does.
            for value in ["Hel", "lo", "", " \\\"x\\\"", "\\n", "wörld", "a\tb"] {
                input += &shaped_event("content", value, "", eol);
            }
            for value in ["{\\\"a\\\":", "1}"] {
                input += &shaped_event("arguments", value, "", eol);
            }
            input += &format!(
                "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":4}}}}{eol}{eol}data: [DONE]{eol}{eol}"
            );
            let input = input.as_bytes();
            // Text as written: 3 + 2 + 0 + 6 + 2 + 6 ("ö" is two bytes) + 3, then 7 + 2.
            let expected = (usage(3, 4), 3 + 2 + 6 + 2 + 6 + 3 + 7 + 2, true);
            for strip in [false, true] {
                let (p, _) = run_split(input, &[], strip);
                assert_eq!(summary(&p), expected, "{eol:?}");
                // The first of each shape is read in full, the others by their shape.
                assert_eq!(p.shaped, 7, "{eol:?}");
                assert_reads_as_the_old_parser(input, &[], strip).unwrap();
            }
            let (_, out) = run_split(input, &[], true);
            let kept = input.len() - format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":4}}}}{eol}{eol}").len();
            assert_eq!(out.len(), kept);
        }
    }

    #[test]
    fn a_value_that_could_change_the_reading_is_not_read_by_shape() {
        let eol = "\n";
        // A raw line end inside the value ends the line there; a value that reads as a key
        // followed by a colon; a usage object after it.
        let cases = [
            shaped_event("content", "a", "", eol) + &shaped_event("content", "x\ny", "", eol),
            shaped_event("content", "a", "", eol) + &shaped_event("content", "x\\\ry", "", eol),
            shaped_event("content", "a", ",\"z\":1", eol)
                + &shaped_event("content", "usage", ",\"z\":1", eol),
            shaped_event("arguments", "a", "", eol)
                + &shaped_event("arguments", "\\\"usage", "", eol),
            // Read in full, the second counts a value for `"arguments"` (its colon follows).
            shaped_event("content", "a", ":\"zz\"", eol)
                + &shaped_event("content", "arguments", ":\"zz\"", eol),
            // A match of `"arguments"` ending at the closing quote hides the tail's own
            // (matches of one key do not overlap): counted in one event, not the other.
            "data: {\"content\":\"arguments\"arguments\":\"xyz\"}\n\n\
             data: {\"content\":\"b\"arguments\":\"xyz\"}\n\n"
                .to_string(),
            "data: {\"content\":\"\"arguments\":\"zz\"}\n\n\
             data: {\"content\":\"arguments\"arguments\":\"zz\"}\n\n"
                .to_string(),
        ];
        for input in &cases {
            for strip in [false, true] {
                assert_reads_as_the_old_parser(input.as_bytes(), &[], strip).unwrap();
            }
        }
    }

    proptest! {
        /// Events alike but for one value, the value made of what could fool the shortcut
        /// (escaped quotes, the keys' names, colons, braces, line ends, other control and
        /// non-ASCII bytes, which the eight-byte walk meets), after shapes that
        /// differ, cut anywhere: read as the old parser read them.
        #[test]
        fn events_read_by_shape_read_as_the_old_parser_did(
            events in prop::collection::vec((
                prop::sample::select(vec!["content", "reasoning_content", "arguments", "text"]),
                prop::collection::vec(prop::sample::select(vec![
                    "a", "\\\"", "\\\\", "usage", "\\\"usage", "arguments", "\\\"arguments", "content",
                    ":", "{", "}", " ", "\n", "\r", "\\", "\"", "\t", "\u{1}", "wörld",
                ]), 0..6),
                prop::sample::select(vec!["", ",\"usage\":null", ",\"usage\":{\"prompt_tokens\":1}",
                                          ":{", " :\"zz\"", ",\"content\":\"zz\"",
                                          "arguments\":\"zz\"", "usage\":{}"]),
                prop::sample::select(vec!["\n", "\r\n", "\r"]),
            ), 1..12),
            raw in prop::collection::vec(any::<usize>(), 0..10),
        ) {
            let input: String = events
                .iter()
                .map(|(key, value, after, eol)| shaped_event(key, &value.concat(), after, eol))
                .collect();
            let input = input.as_bytes();
            let cuts = cuts_for(input.len(), raw);
            for strip in [false, true] {
                assert_reads_as_the_old_parser(input, &cuts, strip)?;
                assert_reads_as_the_old_parser(input, &[], strip)?;
            }
        }
    }
}
