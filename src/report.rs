//! JSON views shared by the gateway, the admin API and the CLI: catalog lists, key objects,
//! usage standing and traces.

use serde_json::{json, Value};

use crate::catalog::Catalog;

use crate::clock::{day_index, day_label, month_label, month_start_ms, rfc3339};
use crate::keys::{KeyEntry, KeyRecord, KeyTerms};
use crate::limits::{CounterView, ModelTally};
use crate::money::Nanos;
use crate::store::{Store, StoreError, TraceRow};

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

/// Who asks for a catalog view: the key and every key above it (SPEC §7: a child never
/// exceeds its parent, so it sees only what its whole line may call, as admission narrows
/// it), or nobody (an anonymous, public catalog).
pub type Lineage<'a> = [&'a KeyEntry];

/// Whether every key of `lineage` may be served by model `m`.
fn may_use(lineage: &Lineage<'_>, m: usize, catalog: &Catalog) -> bool {
    lineage.iter().all(|k| k.may_use_model(m, catalog))
}

fn alias_json(catalog: &Catalog, name: &str, chain: &[usize], lineage: &Lineage<'_>) -> Value {
    let models: Vec<&str> = chain
        .iter()
        .filter(|&&m| may_use(lineage, m, catalog))
        .map(|&m| catalog.models()[m].id.as_str())
        .collect();
    json!({ "id": name, "object": "model", "created": 0, "owned_by": "spidergate", "models": models })
}

/// Whether the alias `name` (its models `chain`) is one `lineage` may call: each key may,
/// and some model of the chain is left for all of them.
fn alias_visible(catalog: &Catalog, lineage: &Lineage<'_>, name: &str, chain: &[usize]) -> bool {
    lineage.is_empty()
        || (lineage.iter().all(|k| k.resolve(catalog, name).is_ok())
            && chain.iter().any(|&m| may_use(lineage, m, catalog)))
}

fn visible_aliases<'a>(
    catalog: &'a Catalog,
    lineage: &'a Lineage<'a>,
) -> impl Iterator<Item = (&'a str, &'a [usize])> {
    catalog.alias_names().iter().filter_map(move |name| {
        let chain = catalog.alias_chain(name)?;
        alias_visible(catalog, lineage, name, chain).then_some((name.as_str(), chain))
    })
}

/// `GET /v1/models`: the models this key may call (all of them when anonymous).
pub fn models_list(catalog: &Catalog, lineage: &Lineage<'_>) -> Vec<u8> {
    let data: Vec<Value> = (0..catalog.models().len())
        .filter(|&m| may_use(lineage, m, catalog))
        .map(|m| model_json(catalog, m))
        .collect();
    json!({ "object": "list", "data": data })
        .to_string()
        .into_bytes()
}

/// `GET /v1/aliases`: the aliases this key may call, each with its usable chain.
pub fn aliases_list(catalog: &Catalog, lineage: &Lineage<'_>) -> Vec<u8> {
    let data: Vec<Value> = visible_aliases(catalog, lineage)
        .map(|(name, chain)| alias_json(catalog, name, chain, lineage))
        .collect();
    json!({ "object": "list", "data": data })
        .to_string()
        .into_bytes()
}

/// `GET /v1/models/{id}`: a model or alias this key may call; `None` means 404.
pub fn model_object(catalog: &Catalog, lineage: &Lineage<'_>, id: &str) -> Option<Vec<u8>> {
    if let Some(m) = catalog.model_index(id) {
        let ok = may_use(lineage, m, catalog);
        return ok.then(|| model_json(catalog, m).to_string().into_bytes());
    }
    let chain = catalog.alias_chain(id)?;
    let ok = alias_visible(catalog, lineage, id, chain);
    ok.then(|| {
        alias_json(catalog, id, chain, lineage)
            .to_string()
            .into_bytes()
    })
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
        "monthly_budget_usd": k.budget.map(Nanos::as_usd),
        "budget_mode": k.budget_mode.as_str(),
        "max_inflight": k.max_inflight,
        "max_usd_per_hour": k.max_usd_per_hour.map(Nanos::as_usd),
        "loop_limit": k.loop_limit,
        "allowed_models": k.allowed_models,
        "free_only": k.free_only,
        "client_id": k.client_id,
        "group": k.group,
        "parent_id": k.parent_id,
        "created_at": rfc3339(k.created_at),
        "expires_at": rfc3339(k.expires_at),
        "revoked_at": k.revoked_at.map(rfc3339),
        "last_used_at": k.last_used_at.map(rfc3339),
    })
}

/// A key's standing for one month, from per-model rows and the live counters (the
/// gateway's own, or for the CLI today's count from the store).
pub fn usage_json(
    k: &KeyTerms<'_>,
    month: i64,
    rows: &[ModelTally],
    live: &CounterView,
    now: i64,
) -> Value {
    let (by_model, total) = by_model_json(rows);
    json!({
        "key_id": k.id,
        "name": k.name,
        "month": month_label(month),
        "spend_usd": total.as_usd(),
        "spend_nanodollars": total.get(),
        "spend_display": format!("${total}"),
        "reserved_usd": live.reserved.as_usd(),
        "by_model": by_model,
        // This month's spend of the keys below this one (its minted keys and theirs): its
        // budget counts it too (SPEC §7), so a 402 can come before `spend_usd` reaches it.
        "tree_spend_usd": live.tree_spent.as_usd(),
        "tree_spend_nanodollars": live.tree_spent.get(),
        "budget_usd": k.limits.budget.map(Nanos::as_usd),
        "budget_mode": k.budget_mode().as_str(),
        "requests_this_minute": live.requests_this_minute,
        "requests_today": live.requests_today,
        "requests_in_flight": live.inflight,
        "rpm": k.limits.rpm,
        "rpd": k.limits.rpd,
        "max_inflight": k.limits.max_inflight,
        "max_usd_per_hour": k.limits.max_usd_per_hour.map(Nanos::as_usd),
        "loop_limit": k.limits.loop_limit,
        "budget_resets_at": rfc3339(month_start_ms(month + 1)),
        "expires_at": rfc3339(k.expires_at),
        "status": k.status(now),
    })
}

/// Spend per model as `/v1/usage` shows it (`by_model`), and the total.
fn by_model_json(rows: &[ModelTally]) -> (serde_json::Map<String, Value>, Nanos) {
    let mut by_model = serde_json::Map::new();
    let mut total = Nanos::ZERO;
    for r in rows {
        total += r.spent;
        by_model.insert(
            r.model.to_string(),
            json!({
                "spend_usd": r.spent.as_usd(),
                "spend_nanodollars": r.spent.get(),
                "requests": r.requests,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
            }),
        );
    }
    (by_model, total)
}

/// A group as management views show it (SPEC §7): its limits, this month's spend of the
/// sum of its keys per model (as `/v1/usage` shows a key's), and its keys' ids.
pub fn group_json(
    g: &crate::store::GroupRecord,
    month: i64,
    rows: &[ModelTally],
    reserved: Nanos,
    keys: &[String],
) -> Value {
    let (by_model, total) = by_model_json(rows);
    json!({
        "name": g.name,
        "budget_usd": g.budget.map(Nanos::as_usd),
        "budget_mode": g.budget_mode.as_str(),
        "rpm": g.rpm,
        "month": month_label(month),
        "spend_usd": total.as_usd(),
        "spend_nanodollars": total.get(),
        "reserved_usd": reserved.as_usd(),
        "by_model": by_model,
        "keys": keys,
        "created_at": rfc3339(g.created_at),
    })
}

/// Usage of a key from the store alone (CLI, or admin for a month other than the current).
pub fn stored_usage(
    store: &Store,
    k: &KeyRecord,
    month: i64,
    now: i64,
) -> Result<Value, StoreError> {
    let rows: Vec<ModelTally> = store
        .spend_for_key(&k.id, &month_label(month))?
        .into_iter()
        .map(ModelTally::from)
        .collect();
    // The rolling minute from the traces (the running gateway's counters are out of reach):
    // within a flush interval of what its own API says.
    let live = CounterView {
        requests_today: store.requests_on(&k.id, &day_label(day_index(now)))?,
        requests_this_minute: store.admitted_since(&k.id, now - 60_000)?,
        tree_spent: store.tree_spend(&k.id, &month_label(month))?,
        ..CounterView::default()
    };
    Ok(usage_json(&k.terms(), month, &rows, &live, now))
}

/// Usage as the running gateway sees it, from the key's live counters alone (this node's,
/// or the cluster's in Redis): exact (every settled request is in them), and no database
/// read or commit.
pub fn live_usage(key: &KeyEntry, live: &CounterView, now_wall: i64) -> Value {
    usage_json(&key.terms(), live.month, &live.by_model, live, now_wall)
}

pub fn trace_json(t: &TraceRow) -> Value {
    json!({
        "id": t.id,
        "time": rfc3339(t.ts),
        "ts_ms": t.ts,
        "key_id": t.key_id.as_deref(),
        "endpoint": t.endpoint,
        "requested_model": t.requested_model.as_deref(),
        "served_model": t.served_model.as_deref(),
        "provider": t.provider.as_deref(),
        "status": t.status,
        "error_code": t.error_code,
        "latency_ms": t.latency_ms,
        "ttfb_ms": t.ttfb_ms,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "cost_usd": t.cost.as_usd(),
        "cost_nanodollars": t.cost.get(),
        "usage_estimated": t.usage_estimated,
        "fallback_from": t.fallback_from.as_deref(),
        "trace_id": t.trace_id.map(|id| id.to_string()),
        "unit": t.unit.as_deref(),
        "units": t.units,
    })
}
