//! Strict numbers of the HTTP wire: `Content-Length` and chunk sizes.

/// Strict unsigned decimal (no sign, no spaces inside), at most 18 digits.
pub(crate) fn parse_decimal(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 18 {
        return None;
    }
    let mut n: usize = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(usize::from(b - b'0'))?;
    }
    Some(n)
}

/// The size on a chunk-size line, ignoring chunk extensions.
pub(crate) fn parse_chunk_size(line: &[u8]) -> Option<usize> {
    let digits = match memchr::memchr(b';', line) {
        Some(i) => &line[..i],
        None => line,
    };
    let digits = trim(digits);
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    let mut n: usize = 0;
    for &b in digits {
        let d = char::from(b).to_digit(16)?;
        n = n.checked_mul(16)?.checked_add(d as usize)?;
    }
    Some(n)
}

/// `s` without the spaces and tabs around it.
pub(crate) fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}
