//! The top-level members of a JSON object, found without building values: each member's key
//! and the exact text of its value, every byte of the document checked against JSON's
//! grammar on the way.
//!
//! A request body is read for a handful of top-level fields; serde's walk of the rest (the
//! messages, as `IgnoredAny`) is most of what parsing a chat request costs. This scanner
//! walks the same bytes several times cheaper. It is strict and modest: it gives up (`None`)
//! on whatever it does not accept outright, and the caller then asks serde, so serde stays
//! the judge of every body this refuses, errors and their messages included. It gives up on:
//! a body that is not UTF-8, a key with an escape, a control character in a string, an
//! escape other than JSON's, a malformed number or literal, nesting deeper than
//! [`MAX_DEPTH`], a trailing comma, anything after the object but whitespace, and a document
//! that is not an object. What it accepts, serde accepts and reads alike (the property test
//! in `providers::openai` compares the two on generated and mangled bodies).

/// Deeper documents are left to serde (whose own limit is 128).
pub const MAX_DEPTH: u32 = 64;

/// JSON's four whitespace bytes.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// Bytes that end a run of plain string content: a quote, a backslash, a control character.
const STOPS: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Flags (high bit of the byte) the bytes of `x` that are a quote, a backslash or a control
/// character. The lowest flag is exact (a borrow can only flag bytes above a real one).
fn stop_flags(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
    control | zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\')))
}

/// Where the run of plain content starting at `j` ends (at a stop byte, or the end): eight
/// bytes a step, then byte by byte.
pub(crate) fn plain_run(b: &[u8], mut j: usize) -> usize {
    while let Some(word) = b.get(j..).and_then(|rest| rest.first_chunk::<8>()) {
        let flags = stop_flags(u64::from_le_bytes(*word));
        if flags != 0 {
            return j + (flags.trailing_zeros() / 8) as usize;
        }
        j += 8;
    }
    while b.get(j).is_some_and(|&c| !STOPS[usize::from(c)]) {
        j += 1;
    }
    j
}

/// The end (past the closing quote) of the string opening at `i`, and whether it holds an
/// escape.
fn string_end(b: &[u8], i: usize) -> Option<(usize, bool)> {
    let mut j = i + 1;
    let mut escaped = false;
    loop {
        j = plain_run(b, j);
        match *b.get(j)? {
            b'"' => return Some((j + 1, escaped)),
            b'\\' => {}
            _ => return None,
        }
        escaped = true;
        j += match *b.get(j + 1)? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 2,
            b'u' if b.get(j + 2..j + 6)?.iter().all(u8::is_ascii_hexdigit) => 6,
            _ => return None,
        };
    }
}

/// The end of the number at `i`: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn number_end(b: &[u8], mut i: usize) -> Option<usize> {
    let digits = |b: &[u8], i: usize| {
        let n = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        (n > 0).then_some(i + n)
    };
    if b[i] == b'-' {
        i += 1;
    }
    i = match b.get(i)? {
        b'0' => i + 1,
        b'1'..=b'9' => digits(b, i)?,
        _ => return None,
    };
    if b.get(i) == Some(&b'.') {
        i = digits(b, i + 1)?;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        i = digits(b, i)?;
    }
    Some(i)
}

/// Past an object's key and its colon (`i` at the key's opening quote): where the value
/// starts.
fn past_key(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let (end, _) = string_end(b, i)?;
    let i = skip_ws(b, end);
    (b.get(i) == Some(&b':')).then(|| skip_ws(b, i + 1))
}

/// The end of the value starting at `i` (no leading whitespace). Iterative: the open
/// containers are bits of `open` (1 for an object), so depth costs no stack.
fn value_end(b: &[u8], mut i: usize) -> Option<usize> {
    let mut open: u64 = 0;
    let mut depth = 0u32;
    loop {
        // At the start of a value.
        match *b.get(i)? {
            b'"' => i = string_end(b, i)?.0,
            c @ (b'{' | b'[') => {
                if depth == MAX_DEPTH {
                    return None;
                }
                let object = c == b'{';
                let close = if object { b'}' } else { b']' };
                i = skip_ws(b, i + 1);
                if b.get(i) == Some(&close) {
                    i += 1;
                } else {
                    open = (open << 1) | u64::from(object);
                    depth += 1;
                    if object {
                        i = past_key(b, i)?;
                    }
                    continue;
                }
            }
            b't' if b[i..].starts_with(b"true") => i += 4,
            b'f' if b[i..].starts_with(b"false") => i += 5,
            b'n' if b[i..].starts_with(b"null") => i += 4,
            b'-' | b'0'..=b'9' => i = number_end(b, i)?,
            _ => return None,
        }
        // After a value: close what it ends, or step to the next element.
        loop {
            if depth == 0 {
                return Some(i);
            }
            i = skip_ws(b, i);
            let object = open & 1 == 1;
            match *b.get(i)? {
                b',' => {
                    i = skip_ws(b, i + 1);
                    if object {
                        i = past_key(b, i)?;
                    }
                    break;
                }
                b'}' if object => {}
                b']' if !object => {}
                _ => return None,
            }
            i += 1;
            open >>= 1;
            depth -= 1;
        }
    }
}

/// Calls `member(key, value)` for each top-level member of the object `text` holds, in
/// order, with the value's exact text (no surrounding whitespace). `None` when the document
/// is not one this scanner accepts (see the module) or when `member` returns false.
pub fn members<'a>(text: &'a str, mut member: impl FnMut(&'a str, &'a str) -> bool) -> Option<()> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let (key_end, escaped) = string_end(b, i)?;
            if escaped {
                return None;
            }
            let key = &text[i + 1..key_end - 1];
            i = skip_ws(b, key_end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_ws(b, i + 1);
            i = value_end(b, start)?;
            if !member(key, &text[start..i]) {
                return None;
            }
            i = skip_ws(b, i);
            match b.get(i)? {
                b',' => i = skip_ws(b, i + 1),
                b'}' => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_ws(b, i) == b.len()).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(text: &str) -> Option<Vec<(&str, &str)>> {
        let mut out = Vec::new();
        members(text, |k, v| {
            out.push((k, v));
            true
        })?;
        Some(out)
    }

    #[test]
    fn members_and_their_exact_value_text() {
        let body = r#" { "model" : "gpt-4o" ,"messages":[{"role":"user","content":"a \"q\" \u00e9"}],
            "n":2, "t": -0.5e+3, "o": {"a": [true, false, null, {}], "b": []}, "e": "" } "#;
        assert_eq!(
            collect(body).unwrap(),
            vec![
                ("model", "\"gpt-4o\""),
                (
                    "messages",
                    r#"[{"role":"user","content":"a \"q\" \u00e9"}]"#
                ),
                ("n", "2"),
                ("t", "-0.5e+3"),
                ("o", r#"{"a": [true, false, null, {}], "b": []}"#),
                ("e", "\"\""),
            ]
        );
        assert_eq!(collect("{}").unwrap(), vec![]);
    }

    #[test]
    fn what_it_leaves_to_serde() {
        for body in [
            "",
            "[]",
            "\"x\"",
            "{",
            "{\"a\":1,}",
            "{\"a\":1} x",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":+1}",
            "{\"a\":.5}",
            "{\"a\":1e}",
            "{\"a\":tru}",
            "{\"a\":truex}",
            "{\"a\":[1,]}",
            "{\"a\":[1 2]}",
            "{\"a\":{\"b\"}}",
            "{\"a\":{\"b\":1,}}",
            "{\"a\":{1:2}}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12g4\"}",
            "{\"a\":\"tab\there\"}",
            "{\"a\":\"unterminated}",
            "{\"mod\\u0065l\":\"x\"}",
            "{\"a\":]}",
            "{\"a\":[}",
            "{\"a\" 1}",
        ] {
            assert_eq!(collect(body), None, "{body:?}");
            // And serde refuses each too, or reads it otherwise (escaped key).
            let serde: Result<serde_json::Map<String, serde_json::Value>, _> =
                serde_json::from_str(body);
            assert!(serde.is_err() || body.contains("\\u0065"), "{body:?}");
        }
    }

    #[test]
    fn long_strings_are_checked_word_by_word() {
        let long = "x".repeat(67);
        let ok = format!("{{\"a\":\"{long}\\n{long}\"}}");
        assert_eq!(collect(&ok).unwrap()[0].1.len(), 2 * long.len() + 4);
        for bad in [
            format!("{{\"a\":\"{long}\u{1}{long}\"}}"),
            format!("{{\"a\":\"{long}\\q\"}}"),
            format!("{{\"a\":\"{long}"),
        ] {
            assert_eq!(collect(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_word_check_finds_the_first_stop_byte_at_every_position() {
        for stop in 0u8..=255 {
            for at in 0..8 {
                for fill in [b'a', 0x7f, 0x80, 0xff, 0x21, 0x5d] {
                    let mut w = [fill; 8];
                    w[at] = stop;
                    // Another stop byte after it must not move the answer.
                    if at < 7 {
                        w[7] = b'"';
                    }
                    let mut text = w.to_vec();
                    text.extend_from_slice(b"tail");
                    let first = text.iter().position(|&c| STOPS[usize::from(c)]);
                    assert_eq!(Some(plain_run(&text, 0)), first.or(Some(text.len())));
                }
            }
        }
    }

    #[test]
    fn depth_beyond_the_limit_is_left_to_serde() {
        let nest = |d: usize| format!("{{\"a\":{}1{}}}", "[".repeat(d), "]".repeat(d));
        assert!(collect(&nest(MAX_DEPTH as usize)).is_some());
        assert!(collect(&nest(MAX_DEPTH as usize + 1)).is_none());
    }
}
