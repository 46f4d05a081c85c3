//! W3C Trace Context: `traceparent` read from the agent (continued) or started here, and
//! the `traceparent` the gateway sends upstream and back, naming its own span.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanId, TraceFlags, TraceId};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A parsed `traceparent`: the agent's trace, its span (our parent) and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traceparent {
    pub trace_id: TraceId,
    pub parent: SpanId,
    pub flags: TraceFlags,
}

/// Parses a `traceparent` value by the W3C rules: `00-<32 hex>-<16 hex>-<2 hex>`, lower-case
/// hex, ids not all zero, version `ff` invalid; a later version may append `-...` fields.
pub fn parse_traceparent(v: &[u8]) -> Option<Traceparent> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex_u8(&v[0..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = hex_bytes::<16>(&v[3..35])?;
    let parent = hex_bytes::<8>(&v[36..52])?;
    let flags = hex_u8(&v[53..55])?;
    let (trace_id, parent) = (TraceId::from_bytes(trace_id), SpanId::from_bytes(parent));
    if trace_id == TraceId::INVALID || parent == SpanId::INVALID {
        return None;
    }
    Some(Traceparent {
        trace_id,
        parent,
        flags: TraceFlags::new(flags & 0x01),
    })
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_u8(two: &[u8]) -> Option<u8> {
    Some(hex_digit(two[0])? << 4 | hex_digit(two[1])?)
}

fn hex_bytes<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = hex_u8(&hex[2 * i..2 * i + 2])?;
    }
    Some(out)
}

/// The trace a model call belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// The gateway's span for this call; `INVALID` when telemetry is off and only the agent's
    /// trace id is recorded.
    pub span_id: SpanId,
    /// The agent's span (this call's parent), `INVALID` when the gateway started the trace.
    pub parent: SpanId,
    pub flags: TraceFlags,
    /// The agent's `tracestate`, passed on unchanged (it also goes upstream as sent).
    pub state: Option<HeaderValue>,
}

impl TraceContext {
    /// The context of one model call. With `telemetry` set (`on`), the agent's trace is
    /// continued (or a sampled one started) under a new span of the gateway's. Off, only a
    /// valid `traceparent` from the agent is read, so its trace id lands in the trace row;
    /// that costs one header lookup and allocates nothing.
    pub fn for_request(headers: &HeaderMap, on: bool) -> Option<TraceContext> {
        Self::continuing(headers.get(&TRACEPARENT), headers, on)
    }

    /// [`TraceContext::for_request`], given the request's `traceparent` already found.
    pub fn continuing(
        traceparent: Option<&HeaderValue>,
        headers: &HeaderMap,
        on: bool,
    ) -> Option<TraceContext> {
        let incoming = traceparent.and_then(|v| parse_traceparent(v.as_bytes()));
        if !on {
            return incoming.map(|t| TraceContext {
                trace_id: t.trace_id,
                span_id: SpanId::INVALID,
                parent: t.parent,
                flags: t.flags,
                state: None,
            });
        }
        let ids = RandomIdGenerator::default();
        Some(match incoming {
            Some(t) => TraceContext {
                trace_id: t.trace_id,
                span_id: ids.new_span_id(),
                parent: t.parent,
                flags: t.flags,
                state: headers.get(&TRACESTATE).cloned(),
            },
            None => TraceContext {
                trace_id: ids.new_trace_id(),
                span_id: ids.new_span_id(),
                parent: SpanId::INVALID,
                flags: TraceFlags::SAMPLED,
                state: None,
            },
        })
    }

    /// Whether the gateway has a span of its own in this trace (telemetry on).
    pub fn has_span(&self) -> bool {
        self.span_id != SpanId::INVALID
    }

    /// `traceparent` naming the gateway's span: sent upstream (the provider's work is its
    /// child) and back to the agent. `None` without a gateway span.
    pub fn traceparent(&self) -> Option<HeaderValue> {
        if !self.has_span() {
            return None;
        }
        let text = format!(
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            self.flags.to_u8()
        );
        HeaderValue::from_str(&text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_parses() {
        let t = parse_traceparent(GOOD.as_bytes()).unwrap();
        assert_eq!(t.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent.to_string(), "00f067aa0ba902b7");
        assert!(t.flags.is_sampled());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        // A later version may carry more fields.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        assert!(parse_traceparent(future.as_bytes()).is_some());
    }

    #[test]
    fn the_agents_trace_is_continued_under_a_new_gateway_span() {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static(GOOD));
        h.insert(&TRACESTATE, HeaderValue::from_static("vendor=x"));
        let t = TraceContext::for_request(&h, true).unwrap();
        assert_eq!(t.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent.to_string(), "00f067aa0ba902b7");
        assert!(t.has_span() && t.span_id != t.parent);
        let out = t.traceparent().unwrap();
        let back = parse_traceparent(out.as_bytes()).unwrap();
        assert_eq!(back.trace_id, t.trace_id);
        assert_eq!(back.parent, t.span_id);
        assert_eq!(t.state.unwrap(), "vendor=x");
    }

    #[test]
    fn without_an_agent_trace_one_is_started_and_sampled() {
        let t = TraceContext::for_request(&HeaderMap::new(), true).unwrap();
        assert!(t.has_span() && t.trace_id != TraceId::INVALID);
        assert_eq!(t.parent, SpanId::INVALID);
        assert!(t.flags.is_sampled());
    }

    #[test]
    fn telemetry_off_records_only_the_agents_trace_id() {
        assert!(TraceContext::for_request(&HeaderMap::new(), false).is_none());
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static(GOOD));
        let t = TraceContext::for_request(&h, false).unwrap();
        assert!(!t.has_span() && t.traceparent().is_none());
        assert_eq!(t.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
