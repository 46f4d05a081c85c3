//! The request-phase decision, as plain functions: route, authenticate, authorize, admit.
//!
//! Order matters (SPEC §2): token shape, then lookup, expiry and revocation (401), then scope
//! (403), then body (413, 400), model (404, 403), budget (402), the runaway-agent brakes
//! (429 `spend_rate_exceeded`, `loop_detected`) and rate limits (429). A caller
//! without a valid key learns nothing beyond 401, and the first failing check decides.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;

use crate::catalog::{Catalog, Chain};
use crate::clock::Now;
pub use crate::config::Family;
use crate::error::GateError;
use crate::keys::token::{
    from_authorization, is_well_formed, redact_secrets, TokenHash, TokenMemo, TOKEN_PREFIX,
};
use crate::keys::{KeyEntry, KeySet, ScopeSet};
use crate::limits::brakes::{request_digest, UPLOAD_LOOP_PREFIX};
use crate::limits::store::LimitStore;
use crate::limits::{Reservation, Standing, SETTLE_WAIT};
use crate::money::Nanos;
use crate::providers::multipart;
use crate::providers::openai::{
    images_n, named_model, parse_media_request, parse_request, MediaKind, RequestFields,
};
use crate::providers::Plan;

/// How model `m` is reached for this request, and the body it gets: the client's with its
/// model replaced, or its translation (400 for what cannot be translated).
pub fn upstream_body(
    catalog: &Catalog,
    endpoint: Endpoint,
    m: usize,
    body: &Bytes,
    fields: &RequestFields,
) -> Result<(Plan, Bytes), GateError> {
    let model = &catalog.models()[m];
    let plan = Plan::new(endpoint, catalog.provider_of(m).kind).ok_or_else(|| {
        GateError::InvalidRequest(format!("model '{}' cannot serve this endpoint", model.id))
    })?;
    let upstream = plan.upstream_body(
        body,
        fields,
        &model.upstream_id,
        output_cap(catalog, m, fields),
    )?;
    Ok((plan, upstream))
}

/// The output one choice may produce on model `m`, as reserved and as written upstream: the
/// larger max-token field capped at the model's maximum (a provider never produces more),
/// or that maximum when the request sets none.
pub fn output_cap(catalog: &Catalog, m: usize, fields: &RequestFields) -> u64 {
    let model_max = u64::from(catalog.models()[m].max_output_tokens);
    fields
        .max_output_tokens
        .map_or(model_max, |t| t.min(model_max))
}

/// Input the body does not show, checked before anything is reserved (SPEC §2). A
/// server-side tool adds input per use without a bound, and stored context or a file is
/// bounded only by a model's `context_window_tokens`: for a hard-budget key either is
/// refused with 400 naming the field, so its cap cannot be passed.
pub fn check_hidden_input(
    catalog: &Catalog,
    chain: &Chain,
    fields: &RequestFields,
    hard_budget: bool,
) -> Result<(), GateError> {
    if !hard_budget {
        return Ok(());
    }
    let hidden = &fields.hidden;
    if let Some(field) = &hidden.server_tool {
        return Err(GateError::InvalidRequest(format!(
            "{field}: a server-side tool is billed per use beyond what the request shows, so a key with a hard budget cannot use it"
        )));
    }
    if let Some(field) = &hidden.unseen_input {
        let unbounded = (0..chain.len())
            .filter_map(|i| chain.get(i))
            .find(|&m| catalog.models()[m].context_window_tokens.is_none());
        if let Some(m) = unbounded {
            return Err(GateError::InvalidRequest(format!(
                "{field}: adds input the request does not show, which model '{}' has no context_window_tokens to bound, so a key with a hard budget cannot send it",
                catalog.models()[m].id
            )));
        }
    }
    Ok(())
}

pub use crate::endpoint::{route, Endpoint};

/// The scope a key needs for `endpoint` (None: public or unknown).
pub fn required_scope(endpoint: Endpoint) -> Option<(ScopeSet, &'static str)> {
    match endpoint {
        Endpoint::ChatCompletions
        | Endpoint::Embeddings
        | Endpoint::Responses
        | Endpoint::Messages
        | Endpoint::CountTokens
        | Endpoint::ImagesGenerations
        | Endpoint::Speech
        | Endpoint::ImagesEdits
        | Endpoint::Transcriptions
        | Endpoint::Translations => Some((ScopeSet::CHAT, crate::keys::SCOPE_CHAT)),
        Endpoint::Models | Endpoint::Model | Endpoint::Aliases => {
            Some((ScopeSet::MODELS, crate::keys::SCOPE_MODELS))
        }
        Endpoint::Usage => Some((ScopeSet::USAGE, crate::keys::SCOPE_USAGE)),
        Endpoint::Keys | Endpoint::KeyRevoke => Some((ScopeSet::KEYS, crate::keys::SCOPE_KEYS)),
        Endpoint::Health | Endpoint::MessagesOther | Endpoint::Unknown => None,
    }
}

/// The agent's token -> its live key, and the token's digest (for the second lookup at
/// admission): a bearer token, or else (as the Anthropic SDKs and Claude Code send it) the
/// bare token in `x-api-key`. 401 for a missing, malformed or unknown token; never echoed.
/// The digest of a token that authenticated before on this thread is not computed again
/// ([`TokenMemo`]).
/// `x_api_key` is looked up only when `authorization` holds no agent key.
pub fn authenticate<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: impl FnOnce() -> Option<&'a [u8]>,
    keys: &KeySet,
    now: i64,
) -> Result<(TokenHash, Arc<KeyEntry>), GateError> {
    let token = agent_token(authorization, x_api_key);
    let (hash, fresh) = TokenMemo::digest(token.ok_or(GateError::InvalidApiKey)?);
    // Remembered only once it matched a key, so a flood of made-up tokens evicts nothing;
    // whether the key is alive is checked at every request, not remembered.
    let key = lookup(keys, &hash, now)?;
    if let Some(tag) = fresh {
        TokenMemo::remember(tag, &hash);
    }
    Ok((hash, key))
}

/// The agent key as a bearer token, else as `x-api-key` (SPEC §3: either is accepted; a
/// client that sends its key in one may send something else in the other).
fn agent_token<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: impl FnOnce() -> Option<&'a [u8]>,
) -> Option<&'a str> {
    authorization.and_then(from_authorization).or_else(|| {
        x_api_key()
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
            .filter(|t| is_well_formed(t))
    })
}

/// Whether the request carries a well-formed agent token: one a key made since the last
/// snapshot could have (see `Gate::catch_up_keys`).
pub fn has_agent_token<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: impl FnOnce() -> Option<&'a [u8]>,
) -> bool {
    agent_token(authorization, x_api_key).is_some()
}

/// The key a token refused as revoked or expired belongs to, for the refusal's trace
/// (SPEC §4: every trace names its key). Only on that path: it digests the token again.
pub fn refused_key<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: impl FnOnce() -> Option<&'a [u8]>,
    keys: &KeySet,
) -> Option<Arc<KeyEntry>> {
    let (hash, _) = TokenMemo::digest(agent_token(authorization, x_api_key)?);
    keys.by_hash(&hash).map(|(k, _)| k.clone())
}

/// Token hash -> live key at `now`: 401 if unknown, expired or revoked. Called when the
/// request arrives and again at the moment of admission, after the body was read.
pub fn lookup(keys: &KeySet, hash: &TokenHash, now: i64) -> Result<Arc<KeyEntry>, GateError> {
    let (key, valid_until) = keys.by_hash(hash).ok_or(GateError::InvalidApiKey)?;
    key.check_alive(now)?;
    // A minted key lives only while every key above it does (SPEC §7).
    crate::fleet::check_tree_alive(keys, key, now)?;
    // A secret replaced by a rotation works until its grace period ends, then is revoked.
    if now >= valid_until {
        return Err(GateError::TokenRevoked);
    }
    Ok(key.clone())
}

pub fn check_scope(key: &KeyEntry, endpoint: Endpoint) -> Result<(), GateError> {
    match required_scope(endpoint) {
        Some((scope, name)) if !key.scopes.contains(scope) => {
            Err(GateError::InsufficientScope(name))
        }
        _ => Ok(()),
    }
}

/// [`check_scope`] for a key and every key above it: a child never holds more than its
/// parent holds now (SPEC §7), also after the parent was narrowed.
/// `now` is read only for a child key.
pub fn check_tree_scope(
    keys: &KeySet,
    key: &KeyEntry,
    endpoint: Endpoint,
    now: impl FnOnce() -> i64,
) -> Result<(), GateError> {
    check_scope(key, endpoint)?;
    if key.parent.is_none() {
        return Ok(());
    }
    crate::fleet::ancestors(keys, key, now())?
        .into_iter()
        .try_for_each(|a| check_scope(a, endpoint))
}

/// `chain` (what `key` resolved `name` to) without the models a key above it may not use
/// now: a child's allow-list never reaches past its parent's, also after the parent was
/// narrowed. 403 `model_not_allowed` when nothing is left.
fn within_ancestors(
    catalog: &Catalog,
    keys: &KeySet,
    key: &KeyEntry,
    chain: Chain,
    name: &str,
    now: i64,
) -> Result<Chain, GateError> {
    if key.parent.is_none() {
        return Ok(chain);
    }
    let mut chain = chain;
    for a in crate::fleet::ancestors(keys, key, now)? {
        let theirs = a.resolve(catalog, name)?;
        chain = chain.filtered(|m| theirs.contains(m));
    }
    if chain.is_empty() {
        return Err(GateError::ModelNotAllowed(name.to_string()));
    }
    Ok(chain)
}

/// An admitted model request: what to forward and the budget it holds.
#[derive(Debug)]
pub struct Admission {
    pub fields: RequestFields,
    /// The models that may serve it, best first: those the key may use and whose provider
    /// can serve this endpoint.
    pub chain: Chain,
    /// How the first attempt reaches its provider.
    pub plan: Plan,
    /// The first attempt's body, as its provider gets it (built before anything is
    /// reserved, so a request that cannot be translated costs nothing). The proxy moves it
    /// out into its request context at admission: empty after that.
    pub upstream_body: Bytes,
    pub standing: Standing,
    /// Taken when settled: at the end of the response (a shared store, so the next request
    /// on any node sees it), else when the request's context finishes.
    pub reservation: Option<Reservation>,
    /// The upper bound the reservation was computed from (journaled for crash recovery).
    pub bound: Bound,
    /// When the decision was taken: the request's spend belongs to this month and day.
    pub admitted_at: i64,
    /// Whether a hard budget (the key's, a parent's or its group's) bounds this request.
    pub hard_budget: bool,
    /// Whether a cap holds this request to its reservation (`limits::reservation_binds`).
    pub reservation_binds: bool,
}

/// The most a request can cost on any model of its chain, and the token counts behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Nanos,
    /// The chain position whose price gives `cost`.
    pub model: usize,
}

/// Upper bound of a request's cost on any model of its chain (SPEC §2: a true upper bound
/// for every request shape). Prompt: every token is at least one byte of the body, plus
/// `media_part_tokens` for each image, audio or file part, whose bytes say nothing about
/// their tokens, plus `tool_prompt_tokens` for the provider's tool-use system prompt and each
/// provider-defined tool; with stored context or files, at least the model's context window
/// (see [`check_hidden_input`]). Output: `n` choices of [`output_cap`]. Saturating
/// throughout: a bound that cannot be represented is `Nanos::MAX`, which no budget admits.
pub fn reservation_bound(
    catalog: &Catalog,
    chain: &Chain,
    endpoint: Endpoint,
    fields: &RequestFields,
    body_len: usize,
    overheads: Overheads,
) -> Bound {
    let seen = (body_len as u64)
        .saturating_add(
            fields
                .media_parts
                .saturating_mul(overheads.media_part_tokens),
        )
        .saturating_add(fields.hidden.overhead_tokens(overheads.tool_prompt_tokens));
    let mut best = Bound {
        prompt_tokens: seen,
        completion_tokens: 0,
        cost: Nanos::ZERO,
        model: 0,
    };
    for (i, m) in (0..chain.len()).filter_map(|i| chain.get(i).map(|m| (i, m))) {
        let prompt = match (
            &fields.hidden.unseen_input,
            catalog.models()[m].context_window_tokens,
        ) {
            (Some(_), Some(window)) => seen.max(window),
            _ => seen,
        };
        let completion = match endpoint {
            Endpoint::Embeddings | Endpoint::CountTokens => 0,
            // Token-priced image models: each image within the output cap.
            Endpoint::ImagesGenerations | Endpoint::ImagesEdits => {
                output_cap(catalog, m, fields).saturating_mul(fields.units)
            }
            _ => output_cap(catalog, m, fields)
                .saturating_add(fields.prediction_tokens)
                .saturating_mul(fields.choices),
        };
        // A token count is free; it still counts against rpm and rpd.
        let cost = match endpoint {
            Endpoint::CountTokens => Nanos::ZERO,
            _ => catalog.bound_cost_with_units(
                m,
                prompt,
                completion,
                bound_units(endpoint, fields, overheads),
            ),
        };
        if i == 0 || cost > best.cost {
            best = Bound {
                prompt_tokens: prompt,
                completion_tokens: completion,
                cost,
                model: i,
            };
        }
    }
    best
}

/// The most units a request can be charged at its model's unit price: the images asked
/// for, the speech input's characters, or the audio's duration in ms: read from the file's
/// header where it can be (a WAV), else `server.max_audio_seconds`.
pub fn bound_units(endpoint: Endpoint, fields: &RequestFields, overheads: Overheads) -> u64 {
    match endpoint {
        Endpoint::Transcriptions | Endpoint::Translations if fields.units == 0 => {
            overheads.max_audio_ms
        }
        _ => fields.units,
    }
}

/// The configured bounds of what a body's bytes do not show (`server.media_part_tokens`,
/// `server.tool_prompt_tokens`, `server.max_audio_seconds`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overheads {
    pub media_part_tokens: u64,
    pub tool_prompt_tokens: u64,
    /// The duration bound of a transcription's audio, in milliseconds.
    pub max_audio_ms: u64,
}

impl Overheads {
    pub fn of(tuning: &crate::config::Tuning) -> Overheads {
        Overheads {
            media_part_tokens: u64::from(tuning.media_part_tokens),
            tool_prompt_tokens: u64::from(tuning.tool_prompt_tokens),
            max_audio_ms: u64::from(tuning.max_audio_seconds) * 1000,
        }
    }
}

/// The request's fields as its endpoint's body carries them (400 when it does not).
/// Multipart bodies are scanned for their `model`, `n` and `response_format` parts only.
pub fn parse_fields(
    endpoint: Endpoint,
    body: &Bytes,
    content_type: Option<&[u8]>,
) -> Result<RequestFields, GateError> {
    match endpoint {
        Endpoint::ImagesGenerations => parse_media_request(body, MediaKind::Images),
        Endpoint::Speech => parse_media_request(body, MediaKind::Speech),
        _ if endpoint.takes_form() => {
            let form = multipart::parse(body, &multipart::boundary(content_type)?)?;
            form_fields(endpoint, &form, form.audio_ms, true)
        }
        _ => parse_request(body),
    }
}

/// The most inputs an image edit takes: 16 images (OpenAI's limit for its image models)
/// and a mask. A form with more is refused, so that one forwarded as it arrives, whose
/// later parts are unknown when it is admitted, is bounded by this many.
pub const MAX_EDIT_MEDIA_PARTS: u64 = 17;

/// 400 for an image edit with more inputs than [`MAX_EDIT_MEDIA_PARTS`].
pub fn check_edit_media_parts(form: &multipart::Form) -> Result<(), GateError> {
    if form.media_parts > MAX_EDIT_MEDIA_PARTS {
        return Err(GateError::InvalidRequest(
            "an image edit takes at most 16 images and a mask".into(),
        ));
    }
    Ok(())
}

/// The fields of a form (`whole`, or the head of one forwarded as it arrives): its model,
/// and its units: the images asked for, or the audio's duration where `audio_ms` bounds it
/// (else 0: the configured bound, see `bound_units`). An image edit's inputs are media
/// parts (each bounded by `media_part_tokens` for token-priced image models): those of a
/// whole form, else as many as an edit may have.
pub fn form_fields(
    endpoint: Endpoint,
    form: &multipart::Form,
    audio_ms: Option<u64>,
    whole: bool,
) -> Result<RequestFields, GateError> {
    let (units, media_parts) = match endpoint {
        Endpoint::ImagesEdits => {
            check_edit_media_parts(form)?;
            let n = form.n.as_deref().map_or(Ok(1), images_n)?;
            let parts = if whole {
                form.media_parts
            } else {
                MAX_EDIT_MEDIA_PARTS
            };
            (n, parts)
        }
        _ => (audio_ms.unwrap_or(0), 0),
    };
    Ok(RequestFields::for_form(
        &form.model,
        form.model_span.clone(),
        units,
        media_parts,
    ))
}

/// The opening of a large form that is forwarded as it arrives (`proxy::upload`): what was
/// read of it when the request is decided. `body` is then that opening.
#[derive(Debug, Clone, Copy)]
pub struct FormHead<'a> {
    /// Its fields so far: the `model` part is among them.
    pub form: &'a multipart::Form,
    /// The whole body's length (its `Content-Length`).
    pub body_len: usize,
    /// A bound on the audio that holds whatever follows (a WAV header's), if any.
    pub audio_ms: Option<u64>,
}

/// The models of `chain` that can serve `endpoint`: of its family (`models[].endpoint`), on
/// a provider kind that speaks it. 400 `invalid_request` when none is left.
pub fn served_chain(
    catalog: &Catalog,
    chain: &Chain,
    endpoint: Endpoint,
    requested: &str,
) -> Result<Chain, GateError> {
    let Some(family) = endpoint.family() else {
        return Err(GateError::NotFound);
    };
    let of_family = chain.filtered(|m| catalog.serves(m, family));
    if of_family.is_empty() {
        let serves = chain
            .get(0)
            .map_or("another", |m| catalog.models()[m].family.label());
        return Err(GateError::InvalidRequest(format!(
            "'{requested}' serves the {serves} endpoints, not /v1/{}",
            endpoint.label().replace('.', "/")
        )));
    }
    let served = of_family.filtered(|m| Plan::new(endpoint, catalog.provider_of(m).kind).is_some());
    if served.is_empty() {
        return Err(GateError::InvalidRequest(format!(
            "'{requested}' is not served through /v1/{}: embeddings, the Responses API, images and audio need an openai-kind model",
            endpoint.label().replace('.', "/")
        )));
    }
    Ok(served)
}

/// The fields of a model request: from the opening of a form forwarded as it arrives
/// (`head`), else from the whole body. 400 when the body does not carry them.
pub fn request_fields(
    endpoint: Endpoint,
    body: &Bytes,
    content_type: Option<&[u8]>,
    head: Option<FormHead<'_>>,
) -> Result<RequestFields, GateError> {
    match head {
        Some(h) => form_fields(endpoint, h.form, h.audio_ms, false),
        None => parse_fields(endpoint, body, content_type),
    }
}

/// Body, model and per-key controls for an authenticated, in-scope model request. Once the
/// body's fields are read, `requested` names the model asked for (the trace of a refusal
/// from then on names it). `now` and `key` must be read at the moment of decision (after
/// the body arrived), so a body trickled across midnight or a key revoked during the upload
/// is judged as things stand now. `limits` takes the key's quota and budget hold last, in
/// one step, once everything that can refuse the request for free has passed; `res_id`
/// names the hold. A multipart form admitted has its `model` value replaced in `body`
/// itself, which is then also the upstream body: an upload is held once
/// ([`multipart::splice_span`]).
#[allow(clippy::too_many_arguments)] // each is one fact of the decision; a struct would only rename them
pub async fn admit<L: LimitStore>(
    limits: &L,
    catalog: &Catalog,
    keys: &KeySet,
    key: &Arc<KeyEntry>,
    endpoint: Endpoint,
    body: &mut Bytes,
    content_type: Option<&[u8]>,
    head: Option<FormHead<'_>>,
    requested: &mut Option<Arc<str>>,
    now: Now,
    overheads: Overheads,
    res_id: u64,
) -> Result<Admission, GateError> {
    let mut fields = match request_fields(endpoint, body, content_type, head) {
        Ok(fields) => fields,
        Err(e) => {
            // A JSON body refused for another field still names its model in the trace.
            if head.is_none() && !endpoint.takes_form() {
                *requested = named_model(body).map(|m| Arc::from(redact_secrets(&m).as_ref()));
            }
            return Err(e);
        }
    };
    // A secret sent as the model names no model (404), and is not repeated in the refusal,
    // the trace or a span. (Model names are mostly shorter than the prefix.)
    if fields.model.len() >= TOKEN_PREFIX.len() {
        if let Cow::Owned(redacted) = redact_secrets(&fields.model) {
            fields.model = Arc::from(redacted);
        }
    }
    *requested = Some(fields.model.clone());
    // What the client sends in all: more than `body` for a form forwarded as it arrives.
    let body_len = head.map_or(body.len(), |h| h.body_len);
    let chain = key.resolve(catalog, &fields.model)?;
    let chain = within_ancestors(catalog, keys, key, chain, &fields.model, now.wall)?;
    let chain = served_chain(catalog, &chain, endpoint, &fields.model)?;
    let first = chain
        .get(0)
        .ok_or(GateError::InvalidRequest(String::new()))?;
    let uplines = crate::fleet::uplines(keys, key, now.wall)?;
    // A hard cap anywhere above the key bounds this request as the key's own would.
    let hard_budget = crate::limits::hard_capped(&key.limits, &uplines);
    check_hidden_input(catalog, &chain, &fields, hard_budget)?;
    let upstream_id = &catalog.models()[first].upstream_id;
    let form = endpoint.takes_form();
    // A form is rewritten in place once admitted (below); only its length is needed now.
    let (plan, upstream) = if form {
        let plan = Plan::new(endpoint, catalog.provider_of(first).kind).ok_or_else(|| {
            let id = &catalog.models()[first].id;
            GateError::InvalidRequest(format!("model '{id}' cannot serve this endpoint"))
        })?;
        (plan, None)
    } else {
        let (plan, b) = upstream_body(catalog, endpoint, first, body, &fields)?;
        (plan, Some(b))
    };
    let upstream_len = upstream.as_ref().map_or_else(
        || body_len - fields.model_span().len() + upstream_id.len(),
        Bytes::len,
    );
    // The provider bills what it receives: the forwarded body can be longer than the
    // client's (an inserted output cap, a longer upstream model id, a translation), so the
    // prompt bound counts the longer of the two. Under a hard budget it also covers every
    // model the chain may fall back to, each with its own forwarded body (built here only
    // for a hard-budget key's alias); a fallback whose body would be longer still is
    // skipped (`proxy::try_fallback`): a form's later models, whose bodies are not built.
    let fallback_len = if hard_budget && !form {
        (1..chain.len())
            .filter_map(|i| chain.get(i))
            .filter_map(|m| upstream_body(catalog, endpoint, m, body, &fields).ok())
            .map(|(_, b)| b.len())
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    let sent_len = body_len.max(upstream_len).max(fallback_len);
    let bound = reservation_bound(catalog, &chain, endpoint, &fields, sent_len, overheads);
    // Only a key with a loop limit pays for hashing its body.
    let digest = key.limits.loop_limit.map(|_| {
        // A large form's opening: its first bytes, as many whatever the pieces it came in.
        let hashed = match head {
            Some(_) => &body[..body.len().min(UPLOAD_LOOP_PREFIX)],
            None => &body[..],
        };
        request_digest(
            endpoint.label(),
            &fields.model,
            hashed,
            head.map(|h| h.body_len),
        )
    });
    let (standing, reservation) = match limits
        .admit(key, &uplines, now, bound.cost, digest, res_id)
        .await
    {
        // The key's last response reached its client before that request's logging phase
        // booked it, so a client that sends its next request at once can find the last
        // one's hold or slot still taken. A refusal that could come from it waits for the
        // bookings running now (microseconds; at most `SETTLE_WAIT`) and is decided once
        // more, at the clock of then. Only refusals pay for this; the refusal consumed
        // nothing.
        Err(e) if e.held_back() && key.counters.finishing() > 0 => {
            key.counters.settled_since(SETTLE_WAIT).await;
            let then = Now::read();
            limits
                .admit(key, &uplines, then, bound.cost, digest, res_id)
                .await?
        }
        admitted => admitted?,
    };
    // A shared store decided by its own clock: the cost is booked at its time, so every node
    // books a request to the month and day the limits counted it in.
    let admitted_at = reservation.decided_at().unwrap_or(now.wall);
    let upstream_body = match upstream {
        Some(b) => b,
        None => {
            fields.set_model_span(multipart::splice_span(
                body,
                fields.model_span(),
                upstream_id,
            ));
            body.clone()
        }
    };
    Ok(Admission {
        fields,
        chain,
        plan,
        upstream_body,
        standing,
        reservation: Some(reservation),
        bound,
        admitted_at,
        hard_budget,
        reservation_binds: crate::limits::reservation_binds(&key.limits, hard_budget),
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

    use proptest::prelude::*;
    use std::path::Path;

    /// `micro` millionths of a dollar per million tokens as the config writes it: "0.150000".
    fn usd_per_mtok(micro: u64) -> String {
        format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
    }

    /// Three models with random prices (µUSD per Mtok) and output ceilings, and an alias over
    /// all of them.
    fn catalog(prices: &[(u64, u64, u32)]) -> Catalog {
        let mut yaml = String::from(
            "listen: \"127.0.0.1:1\"\ndatabase: \"x.db\"\nproviders: [{name: p, kind: openai, base_url: \"http://127.0.0.1:1/v1\"}]\nmodels:\n",
        );
        for (i, (input, output, max)) in prices.iter().enumerate() {
            yaml.push_str(&format!(
                "  - {{id: m{i}, provider: p, input_usd_per_mtok: {}, output_usd_per_mtok: {}, max_output_tokens: {max}}}\n",
                usd_per_mtok(*input),
                usd_per_mtok(*output),
            ));
        }
        yaml.push_str("aliases:\n  all: [m0, m1, m2]\n");
        Catalog::new(&crate::config::Config::parse(&yaml, Path::new("t.yaml")).unwrap())
    }

    fn any_key(c: &Catalog) -> KeyEntry {
        let record = crate::keys::KeyRecord {
            budget_mode: crate::keys::BudgetMode::Hard,
            ..crate::keys::KeyRecord::for_test("key_p")
        };
        KeyEntry::new(record, c, std::sync::Arc::default())
    }

    fn token_field() -> impl Strategy<Value = Option<u64>> {
        prop_oneof![
            Just(None),
            (0u64..100_000).prop_map(Some),
            any::<u64>().prop_map(Some),
            Just(Some(u64::MAX)),
            Just(Some((1 << 63) + 7)),
        ]
    }

    proptest! {
        /// SPEC §2: the reservation is a true upper bound. For any request shape the parser
        /// accepts and any usage a provider could bill for it (prompt within the body and
        /// its media parts, output within n choices of the honoured max-token field, capped
        /// at the model's maximum, plus the predicted tokens it rejects, which it bills as
        /// output), on any model of the chain: billed <= reserved.
        #[test]
        fn billed_never_exceeds_the_reservation(
            prices in proptest::collection::vec((0u64..100_000_000, 0u64..200_000_000, 1u32..200_000), 3),
            max_tokens in token_field(),
            max_completion in token_field(),
            n in 1u64..=128,
            images in 0usize..4,
            padding in 0usize..2_000,
            served in 0usize..3,
            // The full bound often: where a missing term shows.
            prompt_share in prop_oneof![Just(1.0f64), 0.0f64..=1.0],
            output_share in prop_oneof![Just(1.0f64), 0.0f64..=1.0],
            media_part_tokens in 0u64..30_000,
            predicted in prop_oneof![Just(0usize), 1usize..4_000],
            rejected_share in prop_oneof![Just(1.0f64), 0.0f64..=1.0],
        ) {
            let c = catalog(&prices);
            let mut body = serde_json::json!({
                "model": "all",
                "n": n,
                "messages": [{"role": "user", "content": "x".repeat(padding)}],
            });
            if let Some(t) = max_tokens {
                body["max_tokens"] = t.into();
            }
            if let Some(t) = max_completion {
                body["max_completion_tokens"] = t.into();
            }
            if predicted > 0 {
                body["prediction"] = serde_json::json!({"type": "content", "content": "x".repeat(predicted)});
            }
            for _ in 0..images {
                body["messages"].as_array_mut().unwrap().push(serde_json::json!(
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/i.png"}}]}
                ));
            }
            let body = Bytes::from(body.to_string());
            let fields = parse_request(&body).unwrap();
            let key = any_key(&c);
            let chain = key.resolve(&c, "all").unwrap();
            let overheads = Overheads { media_part_tokens, tool_prompt_tokens: 0, max_audio_ms: 0 };
            let bound = reservation_bound(&c, &chain, Endpoint::ChatCompletions, &fields, body.len(), overheads);

            // What the provider may bill on the model that served.
            let m = chain.get(served).unwrap();
            let model_max = u64::from(c.models()[m].max_output_tokens);
            let honoured = max_tokens.max(max_completion).map_or(model_max, |t| t.min(model_max));
            let prompt_ceiling = body.len() as u64 + images as u64 * media_part_tokens;
            let prompt = (prompt_ceiling as f64 * prompt_share) as u64;
            // A rejected predicted token is at least one byte of the prediction.
            let rejected = (predicted as f64 * rejected_share) as u64;
            let completion = ((honoured as f64 * output_share) as u64 + rejected) * n;
            // Billed from the literal prices, not the gateway's `cost`: x µUSD per Mtok is x
            // pico-dollars per token; each side rounded up to the nano-dollar (SPEC: a charge
            // is never rounded down), capped where the ledger's i64 saturates.
            let (input_pico, output_pico, _) = prices[m];
            let up = |tokens: u64, pico: u64| (u128::from(tokens) * u128::from(pico)).div_ceil(1000);
            let billed = (up(prompt.min(prompt_ceiling), input_pico)
                + up(completion.min((honoured + predicted as u64) * n), output_pico))
                .min(i64::MAX as u128);
            prop_assert!(
                billed <= bound.cost.get() as u128,
                "billed {billed} > reserved {}",
                bound.cost
            );
        }
    }
}
