//! The request-phase decision, as plain functions: route, authenticate, authorize, admit.
//!
//! Order matters (SPEC §2): token shape, then lookup, expiry and revocation (401), then scope
//! (403), then body (413, 400), model (404, 403), budget (402) and rate limits (429). A caller
//! without a valid key learns nothing beyond 401, and the first failing check decides.

use std::sync::Arc;

use bytes::Bytes;

use crate::catalog::{Catalog, Chain};
use crate::error::GateError;
use crate::keys::token::{from_authorization, hash_token};
use crate::keys::{KeyEntry, KeySet, ScopeSet};
use crate::limits::{Reservation, Standing};
use crate::providers::openai::{parse_request, RequestFields};

/// Output bound assumed for a hard budget when neither the request nor the model sets one.
pub const DEFAULT_OUTPUT_BOUND: u64 = 16_384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
    Models,
    Model,
    Aliases,
    Usage,
    Health,
    Unknown,
}

impl Endpoint {
    /// Label for traces and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Models => "models",
            Endpoint::Model => "models.get",
            Endpoint::Aliases => "aliases",
            Endpoint::Usage => "usage",
            Endpoint::Health => "health",
            Endpoint::Unknown => "unknown",
        }
    }

    pub fn required_scope(self) -> Option<(ScopeSet, &'static str)> {
        match self {
            Endpoint::ChatCompletions | Endpoint::Embeddings => {
                Some((ScopeSet::CHAT, crate::keys::SCOPE_CHAT))
            }
            Endpoint::Models | Endpoint::Model | Endpoint::Aliases => {
                Some((ScopeSet::MODELS, crate::keys::SCOPE_MODELS))
            }
            Endpoint::Usage => Some((ScopeSet::USAGE, crate::keys::SCOPE_USAGE)),
            Endpoint::Health | Endpoint::Unknown => None,
        }
    }

    /// Path suffix appended to the provider's `base_url`.
    pub fn upstream_suffix(self) -> &'static str {
        match self {
            Endpoint::Embeddings => "/embeddings",
            _ => "/chat/completions",
        }
    }
}

/// Maps a request path to an endpoint; `/api/gate/v1` is the same prefix as `/v1`.
/// For `GET /v1/models/{id}` the id is the rest of the path.
pub fn route(path: &str) -> (Endpoint, &str) {
    if path == "/health" {
        return (Endpoint::Health, "");
    }
    let Some(rest) = path
        .strip_prefix("/v1")
        .or_else(|| path.strip_prefix("/api/gate/v1"))
    else {
        return (Endpoint::Unknown, "");
    };
    let rest = rest.trim_end_matches('/');
    match rest {
        "/chat/completions" => (Endpoint::ChatCompletions, ""),
        "/embeddings" => (Endpoint::Embeddings, ""),
        "/models" => (Endpoint::Models, ""),
        "/aliases" => (Endpoint::Aliases, ""),
        "/usage" => (Endpoint::Usage, ""),
        _ => match rest.strip_prefix("/models/") {
            Some(id) if !id.is_empty() => (Endpoint::Model, id),
            _ => (Endpoint::Unknown, ""),
        },
    }
}

/// Bearer token -> live key. 401 for anything else; the token is never echoed.
pub fn authenticate(
    keys: &KeySet,
    authorization: Option<&[u8]>,
    now: i64,
) -> Result<Arc<KeyEntry>, GateError> {
    let token = authorization
        .and_then(from_authorization)
        .ok_or(GateError::InvalidApiKey)?;
    let key = keys
        .by_hash(&hash_token(token))
        .ok_or(GateError::InvalidApiKey)?;
    key.check_alive(now)?;
    Ok(key.clone())
}

pub fn check_scope(key: &KeyEntry, endpoint: Endpoint) -> Result<(), GateError> {
    match endpoint.required_scope() {
        Some((scope, name)) if !key.scopes.contains(scope) => {
            Err(GateError::InsufficientScope(name))
        }
        _ => Ok(()),
    }
}

/// An admitted model request: what to forward and the budget it holds.
#[derive(Debug)]
pub struct Admission {
    pub fields: RequestFields,
    pub chain: Chain,
    pub standing: Standing,
    pub reservation: Reservation,
    /// Prompt-token upper bound used for the reservation (the body's byte length).
    pub prompt_bound: u64,
}

/// Upper bound of a request's cost on any model of its chain, in nano-dollars.
pub fn cost_bound(
    catalog: &Catalog,
    chain: &Chain,
    endpoint: Endpoint,
    prompt_bound: u64,
    requested_output: Option<u64>,
) -> i64 {
    (0..chain.len())
        .filter_map(|i| chain.get(i))
        .map(|m| {
            let output = match endpoint {
                Endpoint::Embeddings => 0,
                _ => requested_output
                    .or(catalog.models()[m].max_output_tokens.map(u64::from))
                    .unwrap_or(DEFAULT_OUTPUT_BOUND),
            };
            catalog.cost_nanos(m, prompt_bound, output)
        })
        .max()
        .unwrap_or(0)
}

/// Body, model and per-key controls for an authenticated, in-scope model request.
/// On rejection returns the error and the key's standing (for the rate-limit headers).
pub fn admit(
    catalog: &Catalog,
    key: &KeyEntry,
    endpoint: Endpoint,
    body: &Bytes,
    now: i64,
) -> Result<Admission, GateError> {
    let fields = parse_request(body)?;
    let chain = catalog.resolve(&fields.model, key)?;
    // Every token is at least one byte of the body, so its length bounds the prompt.
    let prompt_bound = body.len() as u64;
    let estimate = cost_bound(
        catalog,
        &chain,
        endpoint,
        prompt_bound,
        fields.max_output_tokens,
    );
    let (standing, reservation) = key
        .counters
        .admit(now, &key.limits, estimate)
        .map_err(|(e, _)| e)?;
    Ok(Admission {
        fields,
        chain,
        standing,
        reservation,
        prompt_bound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_both_prefixes() {
        assert_eq!(route("/v1/chat/completions").0, Endpoint::ChatCompletions);
        assert_eq!(
            route("/api/gate/v1/chat/completions").0,
            Endpoint::ChatCompletions
        );
        assert_eq!(route("/api/gate/v1/embeddings").0, Endpoint::Embeddings);
        assert_eq!(
            route("/v1/models/spideriq/fast"),
            (Endpoint::Model, "spideriq/fast")
        );
        assert_eq!(route("/v1/models/").0, Endpoint::Models);
        assert_eq!(route("/health").0, Endpoint::Health);
        assert_eq!(route("/v2/chat/completions").0, Endpoint::Unknown);
        assert_eq!(route("http://evil/v1/chat").0, Endpoint::Unknown);
    }
}
