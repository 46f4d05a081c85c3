//! The gateway's one error type: every rejection maps to an exact status and `error.code`.

use std::fmt;

/// Every way the gateway itself can refuse or fail a request (SPEC §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateError {
    InvalidApiKey,
    TokenExpired,
    TokenRevoked,
    InsufficientScope(&'static str),
    InvalidRequest(String),
    RequestTooLarge(u64),
    ModelNotFound(String),
    ModelNotAllowed(String),
    /// Spend and cap in nano-dollars.
    BudgetExceeded {
        spend_nanos: i64,
        cap_nanos: i64,
    },
    RateLimited {
        limit: u32,
        retry_after_secs: u64,
    },
    DailyRateLimited {
        limit: u32,
        retry_after_secs: u64,
    },
    UpstreamError(String),
    UpstreamTimeout,
    NotFound,
    MethodNotAllowed,
    /// SIGTERM received: in-flight requests finish, new ones are refused.
    ShuttingDown,
}

impl GateError {
    pub fn status(&self) -> u16 {
        match self {
            GateError::InvalidApiKey | GateError::TokenExpired | GateError::TokenRevoked => 401,
            GateError::InsufficientScope(_) | GateError::ModelNotAllowed(_) => 403,
            GateError::InvalidRequest(_) => 400,
            GateError::RequestTooLarge(_) => 413,
            GateError::ModelNotFound(_) | GateError::NotFound => 404,
            GateError::BudgetExceeded { .. } => 402,
            GateError::RateLimited { .. } | GateError::DailyRateLimited { .. } => 429,
            GateError::UpstreamError(_) => 502,
            GateError::UpstreamTimeout => 504,
            GateError::MethodNotAllowed => 405,
            GateError::ShuttingDown => 503,
        }
    }

    /// The `error.code`; also the low-cardinality label for metrics and traces.
    pub fn code(&self) -> &'static str {
        match self {
            GateError::InvalidApiKey => "invalid_api_key",
            GateError::TokenExpired => "token_expired",
            GateError::TokenRevoked => "token_revoked",
            GateError::InsufficientScope(_) => "insufficient_scope",
            GateError::InvalidRequest(_) => "invalid_request",
            GateError::RequestTooLarge(_) => "request_too_large",
            GateError::ModelNotFound(_) => "model_not_found",
            GateError::ModelNotAllowed(_) => "model_not_allowed",
            GateError::BudgetExceeded { .. } => "budget_exceeded",
            GateError::RateLimited { .. } => "rate_limit_exceeded",
            GateError::DailyRateLimited { .. } => "daily_rate_limit_exceeded",
            GateError::UpstreamError(_) => "upstream_error",
            GateError::UpstreamTimeout => "upstream_timeout",
            GateError::NotFound => "not_found",
            GateError::MethodNotAllowed => "method_not_allowed",
            GateError::ShuttingDown => "shutting_down",
        }
    }

    /// OpenAI's `error.type` for the same situation.
    fn kind(&self) -> &'static str {
        match self {
            GateError::InvalidApiKey | GateError::TokenExpired | GateError::TokenRevoked => {
                "authentication_error"
            }
            GateError::InsufficientScope(_) | GateError::ModelNotAllowed(_) => "permission_error",
            GateError::InvalidRequest(_)
            | GateError::RequestTooLarge(_)
            | GateError::ModelNotFound(_)
            | GateError::NotFound
            | GateError::MethodNotAllowed => "invalid_request_error",
            GateError::BudgetExceeded { .. } => "insufficient_quota",
            GateError::RateLimited { .. } | GateError::DailyRateLimited { .. } => "requests",
            GateError::UpstreamError(_) | GateError::UpstreamTimeout | GateError::ShuttingDown => {
                "api_error"
            }
        }
    }

    /// Seconds for `Retry-After`, only on 429s.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GateError::RateLimited {
                retry_after_secs, ..
            }
            | GateError::DailyRateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
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
                "param": null,
            }
        });
        body.to_string().into_bytes()
    }
}

/// Nano-dollars rendered as USD with 6 decimals.
pub fn usd(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let micros = (nanos.unsigned_abs() + 500) / 1000;
    format!("{sign}{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

impl fmt::Display for GateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GateError::InvalidApiKey => f.write_str("Invalid or missing API key. Pass an agent key as 'Authorization: Bearer spideriq_pat_...'."),
            GateError::TokenExpired => f.write_str("This agent key has expired. Mint a new one."),
            GateError::TokenRevoked => f.write_str("This agent key has been revoked."),
            GateError::InsufficientScope(scope) => write!(f, "This agent key lacks the '{scope}' scope required for this endpoint."),
            GateError::InvalidRequest(why) => write!(f, "Invalid request: {why}"),
            GateError::RequestTooLarge(max) => write!(f, "Request body exceeds the limit of {max} bytes."),
            GateError::ModelNotFound(model) => write!(f, "The model '{model}' does not exist."),
            GateError::ModelNotAllowed(model) => write!(f, "This agent key may not use the model '{model}'."),
            GateError::BudgetExceeded { spend_nanos, cap_nanos } => write!(
                f,
                "Monthly budget exceeded: spend ${} of ${} cap (including requests in flight).",
                usd(*spend_nanos),
                usd(*cap_nanos)
            ),
            GateError::RateLimited { limit, retry_after_secs } => write!(f, "Rate limit of {limit} requests per minute reached. Retry after {retry_after_secs} s."),
            GateError::DailyRateLimited { limit, retry_after_secs } => write!(f, "Daily limit of {limit} requests per UTC day reached. Retry after {retry_after_secs} s."),
            GateError::UpstreamError(why) => write!(f, "Upstream provider error: {why}"),
            GateError::UpstreamTimeout => f.write_str("Upstream provider timed out."),
            GateError::NotFound => f.write_str("Unknown endpoint."),
            GateError::MethodNotAllowed => f.write_str("Method not allowed for this endpoint."),
            GateError::ShuttingDown => f.write_str("The gateway is shutting down; retry on another instance."),
        }
    }
}

impl std::error::Error for GateError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_renders_six_decimals() {
        assert_eq!(usd(1_500_000_000), "1.500000");
        assert_eq!(usd(1_234), "0.000001");
        assert_eq!(usd(0), "0.000000");
    }

    #[test]
    fn body_is_openai_shaped() {
        let e = GateError::BudgetExceeded {
            spend_nanos: 2_000_000_000,
            cap_nanos: 1_000_000_000,
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
