//! Keys as both backends store them: the patch type, lists as JSON text, and the column
//! list the key reads share.

use crate::keys::{BudgetMode, KeyRecord};
use crate::money::Nanos;

/// Fields `keys update` may change; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub rpm: Option<Option<u32>>,
    pub rpd: Option<Option<u32>>,
    pub budget: Option<Option<Nanos>>,
    pub budget_mode: Option<BudgetMode>,
    pub max_inflight: Option<Option<u32>>,
    pub allowed_models: Option<Vec<String>>,
    pub free_only: Option<bool>,
    pub client_id: Option<Option<String>>,
    pub expires_at: Option<i64>,
    /// `Some(None)` takes the key out of its group.
    pub group: Option<Option<String>>,
    pub max_usd_per_hour: Option<Option<Nanos>>,
    pub loop_limit: Option<Option<u32>>,
}

impl KeyPatch {
    /// Sets every field the patch names.
    pub fn apply(&self, k: &mut KeyRecord) {
        if let Some(v) = &self.name {
            k.name = v.clone();
        }
        if let Some(v) = &self.scopes {
            k.scopes = v.clone();
        }
        if let Some(v) = self.rpm {
            k.rpm = v;
        }
        if let Some(v) = self.rpd {
            k.rpd = v;
        }
        if let Some(v) = self.budget {
            k.budget = v;
        }
        if let Some(v) = self.budget_mode {
            k.budget_mode = v;
        }
        if let Some(v) = self.max_inflight {
            k.max_inflight = v;
        }
        if let Some(v) = &self.allowed_models {
            k.allowed_models = v.clone();
        }
        if let Some(v) = self.free_only {
            k.free_only = v;
        }
        if let Some(v) = &self.client_id {
            k.client_id = v.clone();
        }
        if let Some(v) = self.expires_at {
            k.expires_at = v;
        }
        if let Some(v) = &self.group {
            k.group = v.clone();
        }
        if let Some(v) = self.max_usd_per_hour {
            k.max_usd_per_hour = v;
        }
        if let Some(v) = self.loop_limit {
            k.loop_limit = v;
        }
    }
}

/// Lists are stored as JSON arrays, so an entry may hold any character (a scope with a
/// comma stays one scope).
pub(super) fn join(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

/// Reads a stored list: a JSON array, or the comma-joined form of databases written before
/// lists were stored as JSON.
pub(super) fn split(s: &str) -> Vec<String> {
    crate::keys::parse_list(s)
}

/// The columns of a full key read, in the order both backends' row readers expect (a macro
/// so `concat!` can build whole `&'static str` queries from it).
macro_rules! key_columns {
    () => {
        "k.id, k.token_hash, k.prefix, k.name, k.scopes, k.rpm, k.rpd, k.budget_nanos, \
         k.budget_mode, k.allowed_models, k.free_only, k.client_id, k.created_at, \
         k.expires_at, k.revoked_at, u.at, k.max_inflight, k.prev_token_hash, \
         k.prev_valid_until, k.rotated_at, k.group_name, k.parent_id, k.max_usd_per_hour_nanos, \
         k.loop_limit"
    };
}
pub(super) use key_columns;

pub(super) const KEY_COLUMNS: &str = key_columns!();

/// Which keys a page of the admin list holds (SPEC §5: the dashboard stays responsive with
/// 10,000 keys because the store pages and searches, not the browser).
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    /// A case-insensitive substring of the id, name, display prefix or group.
    pub q: Option<String>,
    /// Only keys in this status at `now`.
    pub status: Option<KeyStatus>,
    /// Only keys this key minted (its direct children).
    pub parent: Option<String>,
    /// Only keys in this group.
    pub group: Option<String>,
    /// At most this many keys; `None` is every match.
    pub limit: Option<u32>,
    /// Skip this many matches first.
    pub offset: u32,
}

/// A key's status as a filter: the same rule as `KeyTerms::status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

impl KeyStatus {
    pub fn parse(s: &str) -> Option<KeyStatus> {
        match s {
            "active" => Some(KeyStatus::Active),
            "expired" => Some(KeyStatus::Expired),
            "revoked" => Some(KeyStatus::Revoked),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        }
    }
}

/// One page of keys: active first, then expired, then revoked, newest first within each,
/// and how many keys match in all.
#[derive(Debug, Clone, Default)]
pub struct KeyPage {
    pub total: u64,
    pub keys: Vec<KeyRecord>,
}

impl KeyFilter {
    /// The `LIKE` pattern for `q`, lower-cased, its wildcards escaped with `\`.
    pub(super) fn pattern(&self) -> Option<String> {
        let q = self.q.as_deref().map(str::trim).filter(|q| !q.is_empty())?;
        let mut p = String::with_capacity(q.len() + 2);
        p.push('%');
        for c in q.to_lowercase().chars() {
            if matches!(c, '\\' | '%' | '_') {
                p.push('\\');
            }
            p.push(c);
        }
        p.push('%');
        Some(p)
    }
}
