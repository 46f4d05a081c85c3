//! `%XX` escapes, as URLs carry them (RFC 3986 §2.1).

use std::borrow::Cow;

/// `s` with every `%XX` escape (two hex digits, either case) turned into its byte; a `%` not
/// followed by two hex digits stays as it is.
#[must_use]
pub fn decode(s: &str) -> Cow<'_, [u8]> {
    let bytes = s.as_bytes();
    if !bytes.contains(&b'%') {
        return Cow::Borrowed(bytes);
    }
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                // Two hex digits: at most 0xFF.
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(out)
}

/// A path segment as text: [`decode`]d, or as it came if its escapes are not UTF-8 or make
/// a control character (which an id never has, and which would reach the traces and the
/// operator's terminal through `spidergate traces`).
#[must_use]
pub fn decode_segment(s: &str) -> Cow<'_, str> {
    match decode(s) {
        Cow::Borrowed(_) => Cow::Borrowed(s),
        Cow::Owned(v) => match String::from_utf8(v) {
            Ok(text) if !text.chars().any(char::is_control) => Cow::Owned(text),
            _ => Cow::Borrowed(s),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_decoded_and_anything_else_is_kept() {
        assert_eq!(&*decode("spideriq%2Ffast"), b"spideriq/fast");
        assert_eq!(&*decode("a%2fb%41"), b"a/bA");
        assert_eq!(&*decode("plain"), b"plain");
        // Not an escape: kept as is, and never a panic on a multi-byte character after `%`.
        assert_eq!(&*decode("100%"), b"100%");
        assert_eq!(&*decode("%4"), b"%4");
        assert_eq!(&*decode("%zz%"), b"%zz%");
        assert_eq!(&*decode("%aé"), "%aé".as_bytes());
        assert_eq!(&*decode("%é"), "%é".as_bytes());
        assert_eq!(&*decode("%25%32"), b"%2");
    }

    #[test]
    fn a_segment_whose_escapes_are_not_utf8_is_kept_as_it_came() {
        assert_eq!(decode_segment("spideriq%2Ffast"), "spideriq/fast");
        assert_eq!(decode_segment("caf%C3%A9"), "café");
        assert_eq!(decode_segment("bad%FF"), "bad%FF");
        assert_eq!(decode_segment("a%0Ab%1B[31m"), "a%0Ab%1B[31m");
        assert_eq!(decode_segment("a%00b"), "a%00b");
        assert_eq!(decode_segment("a%7Fb"), "a%7Fb");
    }
}
