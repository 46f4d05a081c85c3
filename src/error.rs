//! The gateway's one error type: every rejection maps to an exact status and `error.code`.

use std::fmt;

use crate::money::Nanos;

/// Every way the gateway itself can refuse or fail a request (SPEC §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateError {
    InvalidApiKey,
    TokenExpired,
    TokenRevoked,
    InsufficientScope(&'static str),
    InvalidRequest(String),
    /// A request that names the field it is about in `error.param` (a child key's spec).
    InvalidField {
        field: std::borrow::Cow<'static, str>,
        message: String,
    },
    RequestTooLarge(u64),
    /// The request head exceeds `server.max_header_bytes`.
    HeaderTooLarge(usize),
    /// The request body did not arrive within `server.body_timeout_ms`.
    RequestTimeout,
    ModelNotFound(String),
    ModelNotAllowed(String),
    /// Month-to-date spend (with open reservations) and the cap.
    BudgetExceeded {
        spend: Nanos,
        cap: Nanos,
    },
    /// The hard budget of the key's group, or of a key above it in its tree, would be
    /// passed: `owner` names which ("group 'x'" / "parent key 'key_…'").
    GroupBudgetExceeded {
        owner: String,
        spend: Nanos,
        cap: Nanos,
    },
    /// The key's spend in the rolling hour (settled and held) would pass `max_usd_per_hour`.
    SpendRateExceeded {
        spend: Nanos,
        cap: Nanos,
        retry_after_secs: u64,
    },
    /// The same request more than `loop_limit` times in the rolling minute.
    LoopDetected {
        limit: u32,
        retry_after_secs: u64,
    },
    RateLimited {
        limit: u32,
        retry_after_secs: u64,
    },
    DailyRateLimited {
        limit: u32,
        retry_after_secs: u64,
    },
    /// The key already has `max_inflight` requests open.
    ConcurrencyLimited {
        limit: u32,
    },
    /// Too many failed authentications from one client address.
    AuthFlood {
        retry_after_secs: u64,
    },
    /// A hard-budget key while the spend ledger cannot write.
    LedgerUnavailable,
    /// Shared limits (Redis) unreachable, `on_error: closed`: hard-budget keys pause.
    LimitsUnavailable,
    /// The provider refused every key of its pool (401/429) and none has rested enough.
    ProviderKeysResting {
        retry_after_secs: u64,
    },
    UpstreamError(String),
    UpstreamTimeout,
    NotFound,
    /// A thing the caller named is not there (a key to revoke that is not its descendant):
    /// 404 `not_found`, the message says what.
    Missing(String),
    /// A key asked to mint a child with more than it holds itself (SPEC §7): the message
    /// says what.
    BeyondParent {
        /// The request's field that reaches past the parent, as `param` (SPEC §7: "naming
        /// the field").
        field: Option<&'static str>,
        message: String,
    },
    /// `allow`: the methods the endpoint takes, for the `Allow` header (RFC 9110 §15.5.6).
    MethodNotAllowed {
        allow: &'static str,
    },
    /// SIGTERM received: in-flight requests finish, new ones are refused.
    ShuttingDown,
}

impl GateError {
    /// A refusal that the hold or in-flight slot of a request could cause: one of the key's
    /// responses that ended but is not booked yet may be behind it.
    pub fn held_back(&self) -> bool {
        matches!(
            self,
            GateError::BudgetExceeded { .. }
                | GateError::GroupBudgetExceeded { .. }
                | GateError::SpendRateExceeded { .. }
                | GateError::ConcurrencyLimited { .. }
        )
    }

    pub fn status(&self) -> u16 {
        match self {
            GateError::InvalidApiKey | GateError::TokenExpired | GateError::TokenRevoked => 401,
            GateError::InsufficientScope(_)
            | GateError::BeyondParent { .. }
            | GateError::ModelNotAllowed(_) => 403,
            GateError::InvalidRequest(_) | GateError::InvalidField { .. } => 400,
            GateError::RequestTooLarge(_) => 413,
            GateError::HeaderTooLarge(_) => 431,
            GateError::RequestTimeout => 408,
            GateError::ModelNotFound(_) | GateError::NotFound | GateError::Missing(_) => 404,
            GateError::BudgetExceeded { .. } | GateError::GroupBudgetExceeded { .. } => 402,
            GateError::SpendRateExceeded { .. }
            | GateError::LoopDetected { .. }
            | GateError::RateLimited { .. }
            | GateError::DailyRateLimited { .. }
            | GateError::ConcurrencyLimited { .. }
            | GateError::AuthFlood { .. }
            | GateError::ProviderKeysResting { .. } => 429,
            GateError::LedgerUnavailable | GateError::LimitsUnavailable => 503,
            GateError::UpstreamError(_) => 502,
            GateError::UpstreamTimeout => 504,
            GateError::MethodNotAllowed { .. } => 405,
            GateError::ShuttingDown => 503,
        }
    }

    /// The `error.code`; also the low-cardinality label for metrics and traces.
    pub fn code(&self) -> &'static str {
        match self {
            GateError::InvalidApiKey => "invalid_api_key",
            GateError::TokenExpired => "token_expired",
            GateError::TokenRevoked => "token_revoked",
            GateError::InsufficientScope(_) | GateError::BeyondParent { .. } => {
                "insufficient_scope"
            }
            GateError::InvalidRequest(_) | GateError::InvalidField { .. } => "invalid_request",
            GateError::RequestTooLarge(_) => "request_too_large",
            GateError::HeaderTooLarge(_) => "request_header_too_large",
            GateError::RequestTimeout => "request_timeout",
            GateError::ModelNotFound(_) => "model_not_found",
            GateError::ModelNotAllowed(_) => "model_not_allowed",
            GateError::BudgetExceeded { .. } => "budget_exceeded",
            GateError::GroupBudgetExceeded { .. } => "group_budget_exceeded",
            GateError::SpendRateExceeded { .. } => "spend_rate_exceeded",
            GateError::LoopDetected { .. } => "loop_detected",
            GateError::RateLimited { .. } | GateError::AuthFlood { .. } => "rate_limit_exceeded",
            GateError::DailyRateLimited { .. } => "daily_rate_limit_exceeded",
            GateError::ConcurrencyLimited { .. } => "concurrency_limit_exceeded",
            GateError::ProviderKeysResting { .. } => "upstream_rate_limited",
            GateError::LedgerUnavailable => "ledger_unavailable",
            GateError::LimitsUnavailable => "limits_unavailable",
            GateError::UpstreamError(_) => "upstream_error",
            GateError::UpstreamTimeout => "upstream_timeout",
            GateError::NotFound | GateError::Missing(_) => "not_found",
            GateError::MethodNotAllowed { .. } => "method_not_allowed",
            GateError::ShuttingDown => "shutting_down",
        }
    }

    /// OpenAI's `error.type` for the same situation.
    fn kind(&self) -> &'static str {
        match self {
            GateError::InvalidApiKey | GateError::TokenExpired | GateError::TokenRevoked => {
                "authentication_error"
            }
            GateError::InsufficientScope(_)
            | GateError::BeyondParent { .. }
            | GateError::ModelNotAllowed(_) => "permission_error",
            GateError::InvalidRequest(_)
            | GateError::InvalidField { .. }
            | GateError::RequestTooLarge(_)
            | GateError::HeaderTooLarge(_)
            | GateError::RequestTimeout
            | GateError::ModelNotFound(_)
            | GateError::NotFound
            | GateError::Missing(_)
            | GateError::MethodNotAllowed { .. } => "invalid_request_error",
            GateError::BudgetExceeded { .. } | GateError::GroupBudgetExceeded { .. } => {
                "insufficient_quota"
            }
            GateError::SpendRateExceeded { .. }
            | GateError::LoopDetected { .. }
            | GateError::RateLimited { .. }
            | GateError::DailyRateLimited { .. }
            | GateError::ConcurrencyLimited { .. }
            | GateError::AuthFlood { .. }
            | GateError::ProviderKeysResting { .. } => "requests",
            GateError::UpstreamError(_)
            | GateError::UpstreamTimeout
            | GateError::ShuttingDown
            | GateError::LedgerUnavailable
            | GateError::LimitsUnavailable => "api_error",
        }
    }

    /// The gateway's answer to a proxying failure Pingora reports: `None` when the client is
    /// gone (nothing to answer), 504 for any timeout, else 502 saying what broke.
    pub fn from_proxy(e: &pingora_error::Error) -> Option<GateError> {
        use pingora_error::{ErrorSource, ErrorType};
        if *e.esource() == ErrorSource::Downstream {
            return None;
        }
        Some(match e.etype() {
            ErrorType::ConnectTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
            | ErrorType::TLSHandshakeTimedout => GateError::UpstreamTimeout,
            ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
                GateError::UpstreamError("connection failed".into())
            }
            ErrorType::TLSHandshakeFailure
            | ErrorType::InvalidCert
            | ErrorType::HandshakeError
            | ErrorType::TLSWantX509Lookup => GateError::UpstreamError(
                "TLS handshake with the provider failed (certificate not trusted, or not for its host name); the gateway log has the reason".into(),
            ),
            ErrorType::ConnectProxyFailure => {
                GateError::UpstreamError("the egress proxy refused the tunnel to the provider".into())
            }
            ErrorType::HTTPStatus(s) => GateError::UpstreamError(format!("status {s}")),
            _ => GateError::UpstreamError("connection broke before the response".into()),
        })
    }

    /// Seconds for `Retry-After`, only on 429s.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GateError::SpendRateExceeded {
                retry_after_secs, ..
            }
            | GateError::LoopDetected {
                retry_after_secs, ..
            }
            | GateError::RateLimited {
                retry_after_secs, ..
            }
            | GateError::DailyRateLimited {
                retry_after_secs, ..
            }
            | GateError::AuthFlood { retry_after_secs }
            | GateError::ProviderKeysResting { retry_after_secs } => Some(*retry_after_secs),
            GateError::ConcurrencyLimited { .. } => Some(1),
            _ => None,
        }
    }

    /// The request field the error is about, for `error.param`.
    pub fn param(&self) -> Option<&str> {
        match self {
            GateError::InvalidField { field, .. } => Some(field),
            GateError::BeyondParent { field, .. } => *field,
            _ => None,
        }
    }

    /// The OpenAI-shaped error body. Never includes the caller's token.
    pub fn body(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "code": self.code(),
                "param": self.param(),
            }
        });
        body.to_string().into_bytes()
    }
}

impl fmt::Display for GateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GateError::InvalidApiKey => f.write_str("Invalid or missing API key. Pass an agent key as 'Authorization: Bearer spideriq_pat_...' (or 'x-api-key: spideriq_pat_...')."),
            GateError::TokenExpired => f.write_str("This agent key has expired. Mint a new one."),
            GateError::TokenRevoked => f.write_str("This agent key has been revoked."),
            GateError::InsufficientScope(scope) => write!(f, "This agent key lacks the '{scope}' scope required for this endpoint."),
            GateError::InvalidRequest(why) => write!(f, "Invalid request: {why}"),
            GateError::InvalidField { field, message } => write!(f, "Invalid request: {field}: {message}"),
            GateError::RequestTooLarge(max) => write!(f, "Request body exceeds the limit of {max} bytes."),
            GateError::HeaderTooLarge(max) => write!(f, "Request headers exceed the limit of {max} bytes."),
            GateError::RequestTimeout => f.write_str("The request body did not arrive in time."),
            GateError::ModelNotFound(model) => write!(f, "The model '{model}' does not exist."),
            GateError::BeyondParent { message, .. } => f.write_str(message),
            GateError::ModelNotAllowed(model) => write!(f, "This agent key may not use the model '{model}'."),
            GateError::BudgetExceeded { spend, cap } => write!(
                f,
                "Monthly budget exceeded: spend ${spend} of ${cap} cap (including requests in flight and this request's upper-bound cost)."
            ),
            GateError::GroupBudgetExceeded { owner, spend, cap } => write!(
                f,
                "Monthly budget of {owner} exceeded: spend ${spend} of ${cap} cap (including requests in flight and this request's upper-bound cost)."
            ),
            GateError::SpendRateExceeded { spend, cap, retry_after_secs } => write!(f, "Hourly spend limit reached: ${spend} spent or held in the last 60 minutes of a ${cap} max_usd_per_hour cap, and this request's upper-bound cost does not fit. Retry after {retry_after_secs} s."),
            GateError::LoopDetected { limit, retry_after_secs } => write!(f, "Loop detected: this exact request was sent {limit} times in the last 60 s (loop_limit). Change the request, or retry after {retry_after_secs} s."),
            GateError::RateLimited { limit, retry_after_secs } => write!(f, "Rate limit of {limit} requests per minute reached. Retry after {retry_after_secs} s."),
            GateError::DailyRateLimited { limit, retry_after_secs } => write!(f, "Daily limit of {limit} requests per UTC day reached. Retry after {retry_after_secs} s."),
            GateError::ConcurrencyLimited { limit } => write!(f, "This agent key already has {limit} requests in flight (max_inflight). Retry when one finishes."),
            GateError::AuthFlood { retry_after_secs } => write!(f, "Too many failed authentications from this address. Retry after {retry_after_secs} s."),
            GateError::ProviderKeysResting { retry_after_secs } => write!(f, "The provider is rate-limiting every key the gateway holds for it. Retry after {retry_after_secs} s."),
            GateError::LedgerUnavailable => f.write_str("Spend cannot be recorded right now, so hard-budget keys are paused; retry shortly or on another instance."),
            GateError::LimitsUnavailable => f.write_str("The shared limits store cannot be reached, so hard-budget keys are paused; retry shortly."),
            GateError::UpstreamError(why) => write!(f, "Upstream provider error: {why}"),
            GateError::UpstreamTimeout => f.write_str("Upstream provider timed out."),
            GateError::NotFound => f.write_str("Unknown endpoint."),
            GateError::Missing(what) => f.write_str(what),
            GateError::MethodNotAllowed { .. } => f.write_str("Method not allowed for this endpoint."),
            GateError::ShuttingDown => f.write_str("The gateway is shutting down; retry on another instance."),
        }
    }
}

impl std::error::Error for GateError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_failures_map_to_502_504_or_nothing() {
        use pingora_error::{Error, ErrorType};
        let code = |e: &Error| GateError::from_proxy(e).map(|g| (g.status(), g.code()));
        assert_eq!(
            code(&Error::new_up(ErrorType::ReadTimedout)),
            Some((504, "upstream_timeout"))
        );
        assert_eq!(
            code(&Error::new_up(ErrorType::ConnectRefused)),
            Some((502, "upstream_error"))
        );
        assert_eq!(
            code(&Error::new_up(ErrorType::ConnectionClosed)),
            Some((502, "upstream_error"))
        );
        assert_eq!(code(&Error::new_down(ErrorType::ReadError)), None);
    }

    #[test]
    fn body_is_openai_shaped() {
        let e = GateError::BudgetExceeded {
            spend: Nanos::new(2_000_000_000),
            cap: Nanos::new(1_000_000_000),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "budget_exceeded");
        assert!(v["error"]["param"].is_null());
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("2.000000") && msg.contains("1.000000"),
            "{msg}"
        );
    }
}
