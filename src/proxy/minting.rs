//! `/v1/keys` (SPEC §7): an agent whose key holds `gate:keys` mints keys for its sub-agents,
//! lists them and revokes them, through the same key service as the CLI and the admin API.
//! Store calls run on a blocking thread; the new key is live in this process's snapshot
//! before the answer leaves.

use pingora_core::Result;
use pingora_proxy::Session;
use serde_json::{json, Value};

use super::ctx::RequestCtx;
use super::headers::BodyFraming;
use super::io::{read_body, send_json};
use super::GateProxy;
use crate::admission::Endpoint;
use crate::audit::Actor;
use crate::clock::{now_ms, Now};
use crate::error::GateError;
use crate::limits::store::LimitStore;
use crate::manage::{KeyError, KeyService, MAX_MINTS_PER_MINUTE};
use crate::report;

/// A child-key request's body is a key spec: a few hundred bytes.
const MAX_KEYS_BODY: u64 = 64 * 1024;

/// The key service's refusal, as the agent API answers it.
fn gate_error(e: KeyError) -> GateError {
    match e {
        KeyError::Invalid { field, message } => GateError::InvalidField { field, message },
        KeyError::Forbidden { field, message } => GateError::BeyondParent { field, message },
        KeyError::NotFound(id) => {
            GateError::Missing(format!("No key \"{id}\" among this key's descendants."))
        }
        KeyError::NotFoundWhat(what) => GateError::Missing(what),
        KeyError::Conflict(why) => GateError::InvalidRequest(why),
        KeyError::Store(e) => {
            log::warn!("/v1/keys: {e}");
            GateError::LedgerUnavailable
        }
    }
}

impl GateProxy {
    /// `GET /v1/keys`, `POST /v1/keys`, `POST /v1/keys/{id}/revoke`.
    pub(super) async fn serve_keys(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        target: &str,
    ) -> Result<bool> {
        let Some(key) = ctx.key.clone() else {
            return self.reject(session, ctx, GateError::InvalidApiKey).await;
        };
        let method = session.req_header().method.clone();
        let op = match (ctx.endpoint, &method) {
            (Endpoint::Keys, &http::Method::GET) => Op::List,
            (Endpoint::Keys, &http::Method::POST) => Op::Mint,
            (Endpoint::KeyRevoke, &http::Method::POST) => Op::Revoke(target.to_string()),
            (endpoint, _) => {
                let allow = if endpoint == Endpoint::Keys {
                    "GET, POST"
                } else {
                    "POST"
                };
                let err = GateError::MethodNotAllowed { allow };
                return self.reject(session, ctx, err).await;
            }
        };
        let body = if matches!(op, Op::Mint) {
            let framing = BodyFraming::of(&session.req_header().headers);
            match read_body(session, framing, MAX_KEYS_BODY).await? {
                Ok(b) => b,
                Err(e) => return self.reject(session, ctx, e).await,
            }
        } else {
            bytes::Bytes::new()
        };
        if matches!(op, Op::Mint) {
            if let Err(e) = key.counters.admit_mint(Now::read(), MAX_MINTS_PER_MINUTE) {
                return self.reject(session, ctx, e).await;
            }
        }
        let gate = self.gate.clone();
        let parent = key.id.to_string();
        let done = tokio::task::spawn_blocking(move || -> Result<(u16, Value), GateError> {
            let now = now_ms();
            let mut store = gate
                .open_store()
                .map_err(|e| gate_error(KeyError::Store(e)))?;
            let routes = gate.routes();
            let mut service = KeyService::new(&mut store, &routes.catalog, Actor::agent(&parent));
            let out = match op {
                Op::List => {
                    let data: Vec<Value> = service
                        .children(&parent)
                        .map_err(gate_error)?
                        .iter()
                        .map(|k| report::key_json(k, now))
                        .collect();
                    (200, json!({"object": "list", "data": data}))
                }
                Op::Mint => {
                    let v: Value =
                        serde_json::from_slice(if body.is_empty() { b"{}" } else { &body })
                            .map_err(|e| {
                                GateError::InvalidRequest(format!("body is not JSON: {e}"))
                            })?;
                    if !v.is_object() {
                        return Err(GateError::InvalidRequest(
                            "body must be a JSON object".into(),
                        ));
                    }
                    let spec = crate::admin::fields::key_spec(&v).map_err(gate_error)?;
                    if spec.group.is_some() {
                        return Err(GateError::BeyondParent {
                            field: Some("group"),
                            message: "a child key joins its parent's group; it cannot name one"
                                .into(),
                        });
                    }
                    // Left out, `free_only` is the parent's; asked off under a free-only
                    // parent, it is refused as a change to the child would be.
                    if v.get("free_only") == Some(&Value::Bool(false))
                        && service.get(&parent).map_err(gate_error)?.free_only
                    {
                        return Err(gate_error(crate::manage::KeyError::invalid(
                            "free_only",
                            "the minting key is free-only",
                        )));
                    }
                    let (record, secret) = service
                        .create_child(&parent, spec, now)
                        .map_err(gate_error)?;
                    let mut out = report::key_json(&record, now);
                    out["secret"] = json!(secret);
                    (201, out)
                }
                Op::Revoke(id) => {
                    let k = service
                        .revoke_child(&parent, &id, now)
                        .map_err(gate_error)?;
                    (200, report::key_json(&k, now))
                }
            };
            drop(service);
            if let Err(e) = gate.reload_if_changed(&store) {
                log::warn!("/v1/keys: reload after a change failed: {e}");
            }
            Ok(out)
        })
        .await;
        let (status, value) = match done {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return self.reject(session, ctx, e).await,
            Err(_) => {
                let e = GateError::UpstreamError("key service task failed".into());
                return self.reject(session, ctx, e).await;
            }
        };
        ctx.status = status;
        let standing = self.gate.limits.standing(&key, Now::read());
        send_json(
            session,
            status,
            value.to_string().into_bytes(),
            Some(&standing),
            None,
            None,
        )
        .await?;
        Ok(true)
    }
}

enum Op {
    List,
    Mint,
    Revoke(String),
}
