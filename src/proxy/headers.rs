//! Header work, built once: the gateway's own headers, what never goes upstream, and what
//! never comes back from it.

use http::{HeaderName, HeaderValue};
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::limits::Standing;
use crate::providers::ProviderKind;
use crate::snapshot::ProviderHeaders;

/// `X-SpiderGate-Error-Code` of an upstream's own error response passed through.
pub(super) const UPSTREAM_STATUS: &str = "upstream_status";

pub(super) fn header_bytes<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a [u8]> {
    req.headers.get(name).map(|v| v.as_bytes())
}

/// Client headers that never go upstream: credentials of any kind (the provider's own key
/// replaces the agent's token) and framing the gateway handles itself (the body is already
/// read, so an upstream `100 Continue` would only reach the client a second time).
pub(super) static STRIPPED_HEADERS: [HeaderName; 8] = [
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
    http::header::PROXY_AUTHORIZATION,
    http::header::COOKIE,
    http::header::TRANSFER_ENCODING,
    http::header::EXPECT,
];
pub(super) static ERROR_CODE: HeaderName = HeaderName::from_static("x-spidergate-error-code");

/// Whether an upstream response header reveals the operator's provider account or its
/// limits (SPEC §2): the gateway's own `X-RateLimit-*` are the only ones a client sees.
pub(super) fn is_account_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.starts_with("x-ratelimit-")
        || n.starts_with("anthropic-ratelimit-")
        || n.starts_with("openai-organization")
        || n.starts_with("openai-project")
        || n == "anthropic-organization-id"
        || n == "set-cookie"
        || n == "set-cookie2"
}

/// Drops the upstream's account headers (one pass; removal only when one is present).
pub(super) fn strip_account_headers(resp: &mut ResponseHeader) {
    if !resp.headers.keys().any(is_account_header) {
        return;
    }
    let names: Vec<HeaderName> = resp
        .headers
        .keys()
        .filter(|n| is_account_header(n))
        .cloned()
        .collect();
    for n in &names {
        resp.remove_header(n);
    }
}
pub(super) static UNLIMITED: HeaderValue = HeaderValue::from_static("unlimited");

/// The names of the headers the gateway sets, in the case they are sent, as the case map's
/// static bytes: Pingora keeps a case map beside the header map, and would otherwise
/// title-case a `HeaderName` into a freshly allocated name on every insert.
static LIMIT_REQUESTS_CASE: bytes::Bytes = bytes::Bytes::from_static(b"X-RateLimit-Limit-Requests");
static REMAINING_REQUESTS_CASE: bytes::Bytes =
    bytes::Bytes::from_static(b"X-RateLimit-Remaining-Requests");
static RATE_RESET_CASE: bytes::Bytes = bytes::Bytes::from_static(b"X-RateLimit-Reset");
static BUDGET_WARNING_CASE: bytes::Bytes =
    bytes::Bytes::from_static(b"X-SpiderGate-Budget-Warning");
static ERROR_CODE_CASE: bytes::Bytes = bytes::Bytes::from_static(b"X-SpiderGate-Error-Code");
static FALLBACK_FROM_CASE: bytes::Bytes = bytes::Bytes::from_static(b"X-SpiderGate-Fallback-From");
static SERVED_MODEL_CASE: bytes::Bytes = bytes::Bytes::from_static(b"X-SpiderGate-Model");
static AUTHORIZATION_CASE: bytes::Bytes = bytes::Bytes::from_static(b"Authorization");
static ACCEPT_ENCODING_CASE: bytes::Bytes = bytes::Bytes::from_static(b"Accept-Encoding");
static X_API_KEY_CASE: bytes::Bytes = bytes::Bytes::from_static(b"x-api-key");
static ANTHROPIC_VERSION_CASE: bytes::Bytes = bytes::Bytes::from_static(b"anthropic-version");

/// Header values of the numbers below this are formatted once and shared (a clone is a
/// reference count), so the common case formats nothing per response.
const SHARED_NUMBERS: u64 = 4096;

/// `n` as a header value, without formatting or allocating when it is small.
pub(super) fn number_value(n: u64) -> HeaderValue {
    static SMALL: once_cell::sync::Lazy<Box<[HeaderValue]>> =
        once_cell::sync::Lazy::new(|| (0..SHARED_NUMBERS).map(HeaderValue::from).collect());
    match SMALL.get(n as usize) {
        Some(v) => v.clone(),
        None => HeaderValue::from(n),
    }
}

pub(super) fn add_standing_headers(resp: &mut ResponseHeader, s: &Standing) -> Result<()> {
    match (s.rpm, s.remaining) {
        (Some(limit), Some(remaining)) => {
            resp.insert_header(LIMIT_REQUESTS_CASE.clone(), number_value(limit.into()))?;
            resp.insert_header(
                REMAINING_REQUESTS_CASE.clone(),
                number_value(remaining.into()),
            )?;
        }
        _ => {
            resp.insert_header(LIMIT_REQUESTS_CASE.clone(), UNLIMITED.clone())?;
            resp.insert_header(REMAINING_REQUESTS_CASE.clone(), UNLIMITED.clone())?;
        }
    }
    resp.insert_header(RATE_RESET_CASE.clone(), number_value(s.reset_secs))?;
    if s.budget_warning {
        resp.insert_header(
            BUDGET_WARNING_CASE.clone(),
            HeaderValue::from_static("monthly budget reached (soft limit)"),
        )?;
    }
    Ok(())
}

/// The size of a request head as sent: request line and every header line.
pub(super) fn head_size(req: &RequestHeader) -> usize {
    let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method.as_str().len() + target + 12;
    req.headers
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

static ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
static ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");

/// The request as the provider gets it: its path, its own key (the agent's token and every
/// other credential are removed), its `Host`, the rewritten body's length, and no
/// compression (usage is parsed from the response bytes). An OpenAI-kind provider gets the
/// key as a bearer token; Anthropic as `x-api-key`, with `anthropic-version` (the client's,
/// else the configured one) and the client's `anthropic-beta`.
pub(super) fn rewrite_upstream_request(
    req: &mut RequestHeader,
    provider: &ProviderHeaders,
    key: Option<&HeaderValue>,
    uri: &http::Uri,
    body_len: usize,
) -> Result<()> {
    req.set_uri(uri.clone());
    // One pass over the client's headers; removal (two maps in Pingora) only if needed.
    if req.headers.keys().any(|k| STRIPPED_HEADERS.contains(k)) {
        for h in &STRIPPED_HEADERS {
            req.remove_header(h);
        }
    }
    match provider.kind {
        ProviderKind::OpenAi => {
            match key {
                Some(k) => req.insert_header(AUTHORIZATION_CASE.clone(), k.clone())?,
                None => {
                    req.remove_header(&http::header::AUTHORIZATION);
                }
            }
            if req.headers.contains_key(&ANTHROPIC_VERSION)
                || req.headers.contains_key(&ANTHROPIC_BETA)
            {
                req.remove_header(&ANTHROPIC_VERSION);
                req.remove_header(&ANTHROPIC_BETA);
            }
        }
        ProviderKind::Anthropic => {
            req.remove_header(&http::header::AUTHORIZATION);
            if let Some(k) = key {
                req.insert_header(X_API_KEY_CASE.clone(), k.clone())?;
            }
            if !req.headers.contains_key(&ANTHROPIC_VERSION) {
                req.insert_header(
                    ANTHROPIC_VERSION_CASE.clone(),
                    provider.anthropic_version.clone(),
                )?;
            }
        }
    }
    if provider.kind == ProviderKind::Anthropic {
        drop_pricing_betas(req)?;
    }
    req.insert_header(http::header::HOST, provider.host.clone())?;
    req.insert_header(http::header::CONTENT_LENGTH, number_value(body_len as u64))?;
    req.insert_header(
        ACCEPT_ENCODING_CASE.clone(),
        HeaderValue::from_static("identity"),
    )?;
    Ok(())
}

/// `anthropic-beta` features that change what a request may cost beyond what the gateway
/// priced: the 1M-token context window (input past 200k tokens at a higher price) and long
/// output. They are dropped, every other beta passes.
const PRICING_BETAS: [&str; 2] = ["context-1m-", "output-128k-"];

fn is_pricing_beta(beta: &str) -> bool {
    PRICING_BETAS.iter().any(|p| beta.starts_with(p))
}

/// Removes the [`PRICING_BETAS`] from every `anthropic-beta` header (a comma-separated list).
fn drop_pricing_betas(req: &mut RequestHeader) -> Result<()> {
    let values: Vec<&HeaderValue> = req.headers.get_all(&ANTHROPIC_BETA).iter().collect();
    let affected = values.iter().any(|v| {
        v.to_str()
            .map_or(true, |v| v.split(',').any(|b| is_pricing_beta(b.trim())))
    });
    if !affected {
        return Ok(());
    }
    let kept: Vec<String> = values
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|b| !b.is_empty() && !is_pricing_beta(b))
        .map(str::to_owned)
        .collect();
    req.remove_header(&ANTHROPIC_BETA);
    if !kept.is_empty() {
        let joined = HeaderValue::from_str(&kept.join(",")).map_err(|_| {
            pingora_error::Error::explain(pingora_error::ErrorType::InternalError, "anthropic-beta")
        })?;
        req.insert_header(ANTHROPIC_BETA.clone(), joined)?;
    }
    Ok(())
}

/// The response head as the agent gets it: the upstream's account headers dropped, the
/// gateway's rate-limit headers, the error code of an upstream error, and which model
/// served (and which one failed first).
pub(super) fn decorate_response(
    resp: &mut ResponseHeader,
    standing: &Standing,
    fallback_from: Option<&HeaderValue>,
    served: Option<&HeaderValue>,
) -> Result<()> {
    strip_account_headers(resp);
    add_standing_headers(resp, standing)?;
    if resp.status.as_u16() >= 400 {
        resp.insert_header(
            ERROR_CODE_CASE.clone(),
            HeaderValue::from_static(UPSTREAM_STATUS),
        )?;
    }
    if let Some(from) = fallback_from {
        resp.insert_header(FALLBACK_FROM_CASE.clone(), from.clone())?;
    }
    if let Some(model) = served {
        resp.insert_header(SERVED_MODEL_CASE.clone(), model.clone())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing() -> Standing {
        Standing {
            rpm: Some(7),
            remaining: Some(6),
            reset_secs: 0,
            budget_warning: false,
        }
    }

    #[test]
    fn the_upstream_account_headers_never_reach_the_agent() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (k, v) in [
            ("openai-organization", "org-1"),
            ("openai-project", "proj_1"),
            ("anthropic-organization-id", "a"),
            ("set-cookie", "a=b"),
            ("x-ratelimit-limit-requests", "5000"),
            ("x-ratelimit-remaining-tokens", "9"),
            ("anthropic-ratelimit-requests-limit", "50"),
            ("x-request-id", "req_1"),
        ] {
            resp.append_header(k, v).unwrap();
        }
        let served = HeaderValue::from_static("gpt-4o-mini");
        decorate_response(&mut resp, &standing(), None, Some(&served)).unwrap();
        let h = &resp.headers;
        for gone in [
            "openai-organization",
            "openai-project",
            "anthropic-organization-id",
            "set-cookie",
            "x-ratelimit-remaining-tokens",
            "anthropic-ratelimit-requests-limit",
        ] {
            assert!(h.get(gone).is_none(), "{gone} leaked");
        }
        let limits: Vec<_> = h.get_all("x-ratelimit-limit-requests").iter().collect();
        assert_eq!(limits, vec!["7"], "only the gateway's own");
        assert_eq!(h.get("x-request-id").unwrap(), "req_1");
        assert_eq!(h.get("x-spidergate-model").unwrap(), "gpt-4o-mini");
        assert!(h.get("x-spidergate-error-code").is_none());
    }

    #[test]
    fn an_upstream_error_carries_the_error_code_header() {
        let mut resp = ResponseHeader::build(500, None).unwrap();
        decorate_response(&mut resp, &standing(), None, None).unwrap();
        assert_eq!(
            resp.headers.get("x-spidergate-error-code").unwrap(),
            UPSTREAM_STATUS
        );
    }

    #[test]
    fn the_agent_credentials_are_replaced_by_the_providers() {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (k, v) in [
            ("authorization", "Bearer spideriq_pat_x"),
            ("x-api-key", "k"),
            ("cookie", "c"),
            ("host", "evil"),
            ("expect", "100-continue"),
        ] {
            req.append_header(k, v).unwrap();
        }
        let provider = ProviderHeaders {
            kind: ProviderKind::OpenAi,
            host: HeaderValue::from_static("api.example.com"),
            anthropic_version: HeaderValue::from_static("2023-06-01"),
        };
        let key = HeaderValue::from_static("Bearer sk-up");
        let uri = http::Uri::from_static("/v1/chat/completions");
        rewrite_upstream_request(&mut req, &provider, Some(&key), &uri, 42).unwrap();
        let h = &req.headers;
        assert_eq!(h.get("authorization").unwrap(), "Bearer sk-up");
        assert_eq!(h.get("host").unwrap(), "api.example.com");
        assert_eq!(h.get("content-length").unwrap(), "42");
        for gone in ["x-api-key", "cookie", "expect"] {
            assert!(h.get(gone).is_none(), "{gone} went upstream");
        }
    }

    #[test]
    fn anthropic_gets_its_key_as_x_api_key_with_a_version() {
        let mut req = RequestHeader::build("POST", b"/v1/messages", None).unwrap();
        for (k, v) in [
            ("authorization", "Bearer spideriq_pat_x"),
            ("x-api-key", "spideriq_pat_y"),
            ("anthropic-beta", "tools-2024-04-04"),
        ] {
            req.append_header(k, v).unwrap();
        }
        let provider = ProviderHeaders {
            kind: ProviderKind::Anthropic,
            host: HeaderValue::from_static("api.anthropic.com"),
            anthropic_version: HeaderValue::from_static("2023-06-01"),
        };
        let key = HeaderValue::from_static("sk-ant-up");
        let uri = http::Uri::from_static("/v1/messages");
        rewrite_upstream_request(&mut req, &provider, Some(&key), &uri, 7).unwrap();
        let h = &req.headers;
        assert_eq!(
            h.get_all("x-api-key").iter().collect::<Vec<_>>(),
            vec!["sk-ant-up"]
        );
        assert!(h.get("authorization").is_none());
        assert_eq!(h.get("anthropic-version").unwrap(), "2023-06-01");
        assert_eq!(h.get("anthropic-beta").unwrap(), "tools-2024-04-04");
    }
}
