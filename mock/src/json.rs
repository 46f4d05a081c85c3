//! Hand-written JSON for the hot path (no `format!`, no serde on the way out), and the
//! OpenAI pieces every route shares: error bodies, model objects, usage, ids.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::knobs::Tokens;

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `{"error":{...}}`, OpenAI's error shape.
pub(crate) fn push_openai_error(json: &mut Vec<u8>, message: &str, kind: &str, code: &str) {
    json.extend_from_slice(br#"{"error":{"message":"#);
    push_json_str(json, message);
    json.extend_from_slice(br#","type":"#);
    push_json_str(json, kind);
    json.extend_from_slice(br#","code":"#);
    push_json_str(json, code);
    json.extend_from_slice(br#","param":null}}"#);
}

pub(crate) fn push_model(json: &mut Vec<u8>, id: &str) {
    json.extend_from_slice(br#"{"id":"#);
    push_json_str(json, id);
    json.extend_from_slice(
        br#","object":"model","created":1700000000,"owned_by":"spidergate-mock"}"#,
    );
}

/// `"usage":{...}` of a chat completion; `prompt_tokens_details` only with cache knobs.
pub(crate) fn push_usage(json: &mut Vec<u8>, tokens: &Tokens) {
    let prompt = tokens.all_input();
    json.extend_from_slice(br#""usage":{"prompt_tokens":"#);
    push_u64(json, prompt);
    json.extend_from_slice(br#","completion_tokens":"#);
    push_u64(json, tokens.output);
    json.extend_from_slice(br#","total_tokens":"#);
    push_u64(json, prompt.saturating_add(tokens.output));
    if tokens.cache_read > 0 || tokens.cache_write > 0 {
        json.extend_from_slice(br#","prompt_tokens_details":{"cached_tokens":"#);
        push_u64(json, tokens.cache_read);
        json.push(b'}');
    }
    json.push(b'}');
}
/// `"PREFIX-CONN-REQUEST"`, quoted: unique within one mock.
pub(crate) fn push_id(json: &mut Vec<u8>, prefix: &str, conn_id: u64, request_no: u64) {
    json.push(b'"');
    json.extend_from_slice(prefix.as_bytes());
    push_u64(json, conn_id);
    json.push(b'-');
    push_u64(json, request_no);
    json.push(b'"');
}

/// The same id as [`push_id`], as a `String`.
pub(crate) fn id(prefix: &str, conn_id: u64, request_no: u64) -> String {
    format!("{prefix}{conn_id}-{request_no}")
}
pub(crate) fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

pub(crate) fn push_hex(out: &mut Vec<u8>, mut n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `s` as a quoted JSON string.
pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::numbers::{parse_chunk_size, parse_decimal};

    #[test]
    fn json_strings_are_escaped() {
        let mut out = Vec::new();
        push_json_str(&mut out, "a\"b\\c\nd\u{1}é");
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é");
        let mut n = Vec::new();
        push_u64(&mut n, u64::MAX);
        assert_eq!(n, u64::MAX.to_string().as_bytes());
        let mut h = Vec::new();
        push_hex(&mut h, 0x1abc);
        assert_eq!(h, b"1abc");
        assert_eq!(parse_chunk_size(b"1A ; foo=bar"), Some(26));
        assert_eq!(parse_chunk_size(b""), None);
        assert_eq!(parse_decimal(b"12x"), None);
    }
}
