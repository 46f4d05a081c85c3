//! JSON views shared by the gateway, the admin API and the CLI: catalog lists, key objects,
//! usage standing and traces.

use serde_json::{json, Value};

use crate::catalog::Catalog;
use crate::clock::{
    day_index, day_label, month_index, month_label, month_start_ms, now_ms, rfc3339,
};
use crate::error::usd;
use crate::gate::Gate;
use crate::keys::{KeyEntry, KeyRecord};
use crate::limits::CounterView;
use crate::store::{ModelSpend, Store, StoreError, TraceRow};

fn model_json(catalog: &Catalog, m: usize) -> Value {
    let model = &catalog.models()[m];
    json!({
        "id": model.id,
        "object": "model",
        "created": 0,
        "owned_by": catalog.provider_of(m).name,
        "free": model.free,
    })
}

fn alias_json(catalog: &Catalog, name: &str, chain: &[usize], key: Option<&KeyEntry>) -> Value {
    let models: Vec<&str> = chain
        .iter()
        .filter(|&&m| key.is_none_or(|k| k.may_use_model(m, catalog)))
        .map(|&m| catalog.models()[m].id.as_str())
        .collect();
    json!({ "id": name, "object": "model", "created": 0, "owned_by": "spidergate", "models": models })
}

fn visible_aliases<'a>(
    catalog: &'a Catalog,
    key: Option<&'a KeyEntry>,
) -> impl Iterator<Item = (&'a str, &'a [usize])> {
    catalog.alias_names().iter().filter_map(move |name| {
        let chain = catalog.alias_chain(name)?;
        let ok = key.is_none_or(|k| catalog.resolve(name, k).is_ok());
        ok.then_some((name.as_str(), chain))
    })
}

/// `GET /v1/models`: the models this key may call (all of them when anonymous).
pub fn models_list(catalog: &Catalog, key: Option<&KeyEntry>) -> Vec<u8> {
    let data: Vec<Value> = (0..catalog.models().len())
        .filter(|&m| key.is_none_or(|k| k.may_use_model(m, catalog)))
        .map(|m| model_json(catalog, m))
        .collect();
    json!({ "object": "list", "data": data })
        .to_string()
        .into_bytes()
}

/// `GET /v1/aliases`: the aliases this key may call, each with its usable chain.
pub fn aliases_list(catalog: &Catalog, key: Option<&KeyEntry>) -> Vec<u8> {
    let data: Vec<Value> = visible_aliases(catalog, key)
        .map(|(name, chain)| alias_json(catalog, name, chain, key))
        .collect();
    json!({ "object": "list", "data": data })
        .to_string()
        .into_bytes()
}

/// `GET /v1/models/{id}`: a model or alias this key may call; `None` means 404.
pub fn model_object(catalog: &Catalog, key: Option<&KeyEntry>, id: &str) -> Option<Vec<u8>> {
    if let Some(m) = catalog.model_index(id) {
        let ok = key.is_none_or(|k| k.may_use_model(m, catalog));
        return ok.then(|| model_json(catalog, m).to_string().into_bytes());
    }
    let chain = catalog.alias_chain(id)?;
    let ok = key.is_none_or(|k| catalog.resolve(id, k).is_ok());
    ok.then(|| alias_json(catalog, id, chain, key).to_string().into_bytes())
}

/// A key as management views show it. Never includes the secret or its hash.
pub fn key_json(k: &KeyRecord, now: i64) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "display": format!("spideriq_pat_{}…", k.prefix),
        "status": k.status(now),
        "scopes": k.scopes,
        "rpm": k.rpm,
        "rpd": k.rpd,
        "monthly_budget_usd": k.budget_nanos.map(|n| n as f64 / 1e9),
        "budget_mode": k.budget_mode.as_str(),
        "allowed_models": k.allowed_models,
        "free_only": k.free_only,
        "client_id": k.client_id,
        "created_at": rfc3339(k.created_at),
        "expires_at": rfc3339(k.expires_at),
        "revoked_at": k.revoked_at.map(rfc3339),
        "last_used_at": k.last_used_at.map(rfc3339),
    })
}

/// A key's standing for one month. `live` carries the gateway's in-memory counters when the
/// gateway itself answers; the CLI reads today's count from the store instead.
pub fn usage_json(
    k: &KeyRecord,
    month: i64,
    rows: &[ModelSpend],
    live: CounterView,
    now: i64,
) -> Value {
    let mut by_model = serde_json::Map::new();
    let mut total: i64 = 0;
    for r in rows {
        total += r.cost_nanos;
        by_model.insert(
            r.model.clone(),
            json!({
                "spend_usd": r.cost_nanos as f64 / 1e9,
                "spend_nanodollars": r.cost_nanos,
                "requests": r.requests,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
            }),
        );
    }
    json!({
        "key_id": k.id,
        "name": k.name,
        "month": month_label(month),
        "spend_usd": total as f64 / 1e9,
        "spend_nanodollars": total,
        "spend_display": format!("${}", usd(total)),
        "reserved_usd": live.reserved_nanos as f64 / 1e9,
        "by_model": by_model,
        "budget_usd": k.budget_nanos.map(|n| n as f64 / 1e9),
        "budget_mode": k.budget_mode.as_str(),
        "requests_this_minute": live.requests_this_minute,
        "requests_today": live.requests_today,
        "rpm": k.rpm,
        "rpd": k.rpd,
        "budget_resets_at": rfc3339(month_start_ms(month_index(now) + 1)),
        "expires_at": rfc3339(k.expires_at),
        "status": k.status(now),
    })
}

/// Usage of a key from the store alone (CLI, or admin for a month other than the current).
pub fn stored_usage(
    store: &Store,
    k: &KeyRecord,
    month: i64,
    now: i64,
) -> Result<Value, StoreError> {
    let rows = store.spend_for_key(&k.id, &month_label(month))?;
    let live = CounterView {
        requests_today: store.requests_on(&k.id, &day_label(day_index(now)))?,
        ..CounterView::default()
    };
    Ok(usage_json(k, month, &rows, live, now))
}

/// Usage as the running gateway sees it: everything recorded is flushed first, so the
/// answer includes the caller's previous request.
pub fn live_usage(gate: &Gate, key: &KeyEntry) -> Result<Value, StoreError> {
    // A client may ask right after its previous response arrived, while that request's
    // logging phase is still queueing its ledger entry: give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
    while key.counters.unrecorded() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    gate.ledger.flush_blocking();
    let now = now_ms();
    let month = month_index(now);
    let rows = gate.with_reader(|s| s.spend_for_key(&key.record.id, &month_label(month)))?;
    Ok(usage_json(
        &key.record,
        month,
        &rows,
        key.counters.view(now, &key.limits),
        now,
    ))
}

pub fn trace_json(t: &TraceRow) -> Value {
    json!({
        "time": rfc3339(t.ts),
        "ts_ms": t.ts,
        "key_id": t.key_id.as_deref(),
        "endpoint": t.endpoint,
        "requested_model": t.requested_model,
        "served_model": t.served_model.as_deref(),
        "provider": t.provider.as_deref(),
        "status": t.status,
        "error_code": t.error_code,
        "latency_ms": t.latency_ms,
        "ttfb_ms": t.ttfb_ms,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "cost_usd": t.cost_nanos as f64 / 1e9,
        "cost_nanodollars": t.cost_nanos,
        "usage_estimated": t.usage_estimated,
        "fallback_from": t.fallback_from.as_deref(),
    })
}
