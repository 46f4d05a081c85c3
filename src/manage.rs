//! Key management shared by every door (CLI today, admin API later): validation and creation.

use crate::catalog::Catalog;
use crate::keys::token;
use crate::keys::{
    BudgetMode, KeyRecord, DEFAULT_SCOPES, DEFAULT_TTL_SECS, MAX_TTL_SECS, MIN_TTL_SECS,
};
use crate::money::Nanos;
use crate::store::Store;

/// A request to mint a key; `None` limits mean unlimited.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub rpm: Option<u32>,
    pub rpd: Option<u32>,
    pub budget: Option<Nanos>,
    pub budget_mode: Option<BudgetMode>,
    pub max_inflight: Option<u32>,
    pub allowed_models: Vec<String>,
    pub free_only: bool,
    pub scopes: Option<Vec<String>>,
    pub ttl_secs: Option<i64>,
    pub client_id: Option<String>,
}

/// A budget in USD; rejects negative and non-finite amounts.
pub fn budget(usd: f64) -> Result<Nanos, String> {
    Nanos::from_usd(usd)
        .ok_or_else(|| format!("invalid budget {usd}: use a USD amount between 0 and 1000000000"))
}

/// Every allow-list entry must name a model or alias of the config.
pub fn check_models(catalog: &Catalog, names: &[String]) -> Result<(), String> {
    for n in names {
        if catalog.model_index(n).is_none() && catalog.alias_chain(n).is_none() {
            return Err(format!("unknown model or alias \"{n}\" in the allow-list"));
        }
    }
    Ok(())
}

pub fn check_limit(name: &str, v: Option<u32>) -> Result<(), String> {
    match v {
        Some(0) => Err(format!("{name} must be at least 1 (omit it for unlimited)")),
        _ => Ok(()),
    }
}

/// Validates and stores a new key. Returns the record and the secret, which exists only in
/// this return value: the store keeps its SHA-256.
pub fn create_key(
    store: &mut Store,
    catalog: &Catalog,
    req: NewKey,
    now: i64,
) -> Result<(KeyRecord, String), String> {
    let (record, secret) = mint_key(catalog, req, now)?;
    store
        .insert_key(&record)
        .map_err(|e| format!("database: {e}"))?;
    Ok((record, secret))
}

/// Validates a request and mints the key without storing it (bulk provisioning).
pub fn mint_key(catalog: &Catalog, req: NewKey, now: i64) -> Result<(KeyRecord, String), String> {
    let name = req.name.trim();
    if name.is_empty() {
        return Err("name must not be empty".into());
    }
    check_limit("rpm", req.rpm)?;
    check_limit("rpd", req.rpd)?;
    check_limit("max_inflight", req.max_inflight)?;
    check_models(catalog, &req.allowed_models)?;
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if !(MIN_TTL_SECS..=MAX_TTL_SECS).contains(&ttl) {
        return Err("ttl must be between 1h and 90d".into());
    }
    let scopes = req
        .scopes
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect());
    let minted = token::mint().map_err(|e| format!("cannot read the OS random source: {e}"))?;
    let record = KeyRecord {
        id: token::new_key_id().map_err(|e| format!("cannot read the OS random source: {e}"))?,
        name: name.to_string(),
        prefix: minted.prefix,
        token_hash: minted.hash,
        scopes,
        rpm: req.rpm,
        rpd: req.rpd,
        budget: req.budget,
        budget_mode: req.budget_mode.unwrap_or(BudgetMode::Hard),
        max_inflight: req.max_inflight,
        allowed_models: req.allowed_models,
        free_only: req.free_only,
        client_id: req.client_id.filter(|c| !c.is_empty()),
        created_at: now,
        expires_at: now + ttl * 1000,
        revoked_at: None,
        last_used_at: None,
    };
    Ok((record, minted.secret))
}
