//! Agent keys: the stored record, scopes, and the in-memory [`KeySet`] snapshot the proxy reads.

mod set;
pub mod token;

pub use set::{KeySet, KeySetBuilder};

use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use crate::catalog::{Catalog, Chain, Target};
use crate::clock::now_ms;
use crate::error::GateError;
use crate::limits::{KeyCounters, Limits};
use crate::money::Nanos;
use token::TokenHash;

pub const SCOPE_CHAT: &str = "gate:chat";
pub const SCOPE_MODELS: &str = "gate:models";
pub const SCOPE_USAGE: &str = "gate:usage";
/// Mint, list and revoke child keys through `/v1/keys` (SPEC §7); never a default scope.
pub const SCOPE_KEYS: &str = "gate:keys";
pub const DEFAULT_SCOPES: [&str; 3] = [SCOPE_CHAT, SCOPE_MODELS, SCOPE_USAGE];

pub const MIN_TTL_SECS: i64 = 3_600;
pub const MAX_TTL_SECS: i64 = 90 * 86_400;
pub const DEFAULT_TTL_SECS: i64 = 30 * 86_400;

/// When something given `secs` from `now_ms` ends: on a whole second, the one shown (RFC 3339
/// has no milliseconds here), so a key never authenticates past the `expires_at` it shows.
pub fn ends_after(now_ms: i64, secs: i64) -> i64 {
    now_ms
        .saturating_add(secs.saturating_mul(1000))
        .div_euclid(1000)
        .saturating_mul(1000)
}

/// The gate scopes as bits; other scopes are stored but grant nothing here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeSet(u8);

impl ScopeSet {
    pub const CHAT: ScopeSet = ScopeSet(1);
    pub const MODELS: ScopeSet = ScopeSet(2);
    pub const USAGE: ScopeSet = ScopeSet(4);
    pub const KEYS: ScopeSet = ScopeSet(8);

    pub fn from_names<S: AsRef<str>>(names: &[S]) -> ScopeSet {
        ScopeSet(names.iter().fold(0, |bits, n| {
            bits | match n.as_ref() {
                SCOPE_CHAT => 1,
                SCOPE_MODELS => 2,
                SCOPE_USAGE => 4,
                SCOPE_KEYS => 8,
                _ => 0,
            }
        }))
    }

    pub fn contains(self, other: ScopeSet) -> bool {
        self.0 & other.0 == other.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetMode {
    Soft,
    Hard,
}

impl BudgetMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetMode::Soft => "soft",
            BudgetMode::Hard => "hard",
        }
    }

    pub fn parse(s: &str) -> Option<BudgetMode> {
        match s {
            "soft" => Some(BudgetMode::Soft),
            "hard" => Some(BudgetMode::Hard),
            _ => None,
        }
    }
}

/// One key as stored. Times are unix milliseconds.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub token_hash: TokenHash,
    pub scopes: Vec<String>,
    pub rpm: Option<u32>,
    pub rpd: Option<u32>,
    pub budget: Option<Nanos>,
    pub budget_mode: BudgetMode,
    pub max_inflight: Option<u32>,
    pub allowed_models: Vec<String>,
    pub free_only: bool,
    pub client_id: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
    /// The secret before the last rotation, valid until `previous_valid_until`.
    pub previous_hash: Option<TokenHash>,
    pub previous_valid_until: Option<i64>,
    pub rotated_at: Option<i64>,
    /// The group whose budget and rpm this key also counts against (SPEC §7).
    pub group: Option<String>,
    /// The key that minted this one through `/v1/keys`; its budget bounds this key too.
    pub parent_id: Option<String>,
    /// Runaway-agent brakes (SPEC §7): spend cap over any rolling 60 minutes.
    pub max_usd_per_hour: Option<Nanos>,
    /// Runaway-agent brakes: identical requests allowed per rolling 60 s.
    pub loop_limit: Option<u32>,
}

#[cfg(test)]
impl KeyRecord {
    /// A key for unit tests: no limits, scopes or allow-list, soft budget, never expiring.
    pub(crate) fn for_test(id: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            name: "n".into(),
            prefix: "0000".into(),
            token_hash: [0; 32],
            scopes: vec![],
            rpm: None,
            rpd: None,
            budget: None,
            max_inflight: None,
            budget_mode: BudgetMode::Soft,
            allowed_models: vec![],
            free_only: false,
            client_id: None,
            created_at: 0,
            expires_at: i64::MAX,
            revoked_at: None,
            last_used_at: None,
            previous_hash: None,
            previous_valid_until: None,
            rotated_at: None,
            group: None,
            parent_id: None,
            max_usd_per_hour: None,
            loop_limit: None,
        }
    }
}

impl KeyRecord {
    pub fn limits(&self) -> Limits {
        Limits {
            rpm: self.rpm,
            rpd: self.rpd,
            budget: self.budget,
            hard_budget: self.budget_mode == BudgetMode::Hard,
            max_inflight: self.max_inflight,
            max_usd_per_hour: self.max_usd_per_hour,
            loop_limit: self.loop_limit,
        }
    }

    /// `active`, `expired` or `revoked` at `now`.
    pub fn status(&self, now: i64) -> &'static str {
        self.terms().status(now)
    }

    /// What a usage report says about the key.
    pub fn terms(&self) -> KeyTerms<'_> {
        KeyTerms {
            id: &self.id,
            name: &self.name,
            limits: self.limits(),
            expires_at: self.expires_at,
            revoked: self.revoked_at.is_some(),
        }
    }

    /// The record as a stored row (lists in their stored JSON form), for [`KeySet`].
    fn with_row<T>(&self, f: impl FnOnce(&KeyRow<'_>) -> T) -> T {
        let list = |l: &[String]| serde_json::to_string(l).unwrap_or_else(|_| "[]".into());
        let (scopes, allowed_models) = (list(&self.scopes), list(&self.allowed_models));
        f(&KeyRow {
            id: &self.id,
            name: &self.name,
            token_hash: self.token_hash,
            previous: self.previous_hash.zip(self.previous_valid_until),
            scopes: &scopes,
            allowed_models: &allowed_models,
            limits: self.limits(),
            free_only: self.free_only,
            expires_at: self.expires_at,
            revoked: self.revoked_at.is_some(),
            group: self.group.as_deref(),
            parent: self.parent_id.as_deref(),
        })
    }
}

/// A key's terms as a usage report shows them, from a stored record or a live entry.
#[derive(Debug, Clone, Copy)]
pub struct KeyTerms<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub limits: Limits,
    pub expires_at: i64,
    pub revoked: bool,
}

impl KeyTerms<'_> {
    /// `active`, `expired` or `revoked` at `now`.
    pub fn status(&self, now: i64) -> &'static str {
        if self.revoked {
            "revoked"
        } else if now >= self.expires_at {
            "expired"
        } else {
            "active"
        }
    }

    pub fn budget_mode(&self) -> BudgetMode {
        if self.limits.hard_budget {
            BudgetMode::Hard
        } else {
            BudgetMode::Soft
        }
    }
}

/// One stored key as the snapshot needs it, borrowed from the database row: nothing is
/// allocated to read it. Lists are in their stored form (see [`parse_list`]).
#[derive(Debug, Clone, Copy)]
pub struct KeyRow<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub token_hash: TokenHash,
    /// The secret a rotation replaced, and the end of its grace period.
    pub previous: Option<(TokenHash, i64)>,
    pub scopes: &'a str,
    pub allowed_models: &'a str,
    pub limits: Limits,
    pub free_only: bool,
    pub expires_at: i64,
    pub revoked: bool,
    pub group: Option<&'a str>,
    pub parent: Option<&'a str>,
}

/// A key's live counters, made on its first use: a key not used since start-up costs no
/// counters (at 1,000,000 keys that is most of them). Every snapshot's entry for the same
/// key holds the same counters (see `KeySet`), so reloads never reset them. Reading them is
/// one load of an initialised `OnceLock`, as cheap as the `Arc` it holds.
#[derive(Debug, Default)]
pub struct CounterSlot(OnceLock<Arc<KeyCounters>>);

impl CounterSlot {
    pub fn new(counters: Arc<KeyCounters>) -> CounterSlot {
        CounterSlot(OnceLock::from(counters))
    }

    /// The counters if the key has any yet (never makes them).
    pub fn get(&self) -> Option<&Arc<KeyCounters>> {
        self.0.get()
    }

    /// The counters, to share with another entry of the same key (made now if unused).
    pub fn shared(&self) -> Arc<KeyCounters> {
        self.get_or_make().clone()
    }

    fn get_or_make(&self) -> &Arc<KeyCounters> {
        // A key without ledger rows at load has spent nothing this month and made no
        // request today; any request since went through this very slot.
        self.0
            .get_or_init(|| Arc::new(KeyCounters::restored(now_ms(), 0, Vec::new())))
    }
}

impl Deref for CounterSlot {
    type Target = KeyCounters;

    fn deref(&self) -> &KeyCounters {
        self.get_or_make()
    }
}

/// A key as the request path sees it: the fields every request reads first and together
/// (`repr(C)` keeps them in declaration order, so they share cache lines), then the live
/// counters, then what usage reports and reloads need. Nothing else of the stored record is
/// kept (management views read the store), so a million keys stay small and quick to load.
#[derive(Debug)]
#[repr(C)]
pub struct KeyEntry {
    pub scopes: ScopeSet,
    free_only: bool,
    revoked: bool,
    expires_at: i64,
    pub limits: Limits,
    /// Model indexes this key may be served by; `None` = every model (before `free_only`).
    allowed: Option<IndexBits>,
    /// Alias indexes named in the allow-list (their whole chain is allowed).
    allowed_aliases: IndexBits,
    pub counters: CounterSlot,
    /// The public id, shared into traces without copying.
    pub id: Arc<str>,
    name: Box<str>,
    token_hash: TokenHash,
    /// The secret a rotation replaced and the end of its grace (rare, so boxed).
    previous: Option<Box<(TokenHash, i64)>>,
    /// The key's group (its limits are in the snapshot's [`crate::fleet::Groups`]).
    pub group: Option<Arc<str>>,
    /// The key that minted this one: alive, and with budget, for this key to be usable.
    pub parent: Option<Arc<str>>,
}

/// A key's allow-list as model and alias bits (see [`KeyEntry::may_use_model`]).
#[derive(Debug, Clone)]
pub(crate) struct AllowBits {
    models: Option<IndexBits>,
    aliases: IndexBits,
}

impl AllowBits {
    pub(crate) fn new<S: AsRef<str>>(allowed_models: &[S], catalog: &Catalog) -> AllowBits {
        let mut aliases = IndexBits::new(catalog.alias_names().len());
        let models = if allowed_models.is_empty() {
            None
        } else {
            let mut bits = IndexBits::new(catalog.models().len());
            for name in allowed_models {
                let name = name.as_ref();
                if let Some(m) = catalog.model_index(name) {
                    bits.set(m);
                } else if let Some(a) = catalog.alias_index(name) {
                    aliases.set(a);
                    for &m in catalog.alias_chain(name).unwrap_or(&[]) {
                        bits.set(m);
                    }
                }
            }
            Some(bits)
        };
        AllowBits { models, aliases }
    }
}

impl KeyEntry {
    pub fn new(record: KeyRecord, catalog: &Catalog, counters: Arc<KeyCounters>) -> KeyEntry {
        record.with_row(|row| {
            KeyEntry::from_row(
                row,
                ScopeSet::from_names(&record.scopes),
                AllowBits::new(&record.allowed_models, catalog),
                CounterSlot::new(counters),
            )
        })
    }

    /// An entry from a stored row whose lists are already decoded.
    pub(crate) fn from_row(
        row: &KeyRow<'_>,
        scopes: ScopeSet,
        allow: AllowBits,
        counters: CounterSlot,
    ) -> KeyEntry {
        KeyEntry {
            scopes,
            free_only: row.free_only,
            revoked: row.revoked,
            expires_at: row.expires_at,
            limits: row.limits,
            allowed: allow.models,
            allowed_aliases: allow.aliases,
            counters,
            id: Arc::from(row.id),
            name: Box::from(row.name),
            token_hash: row.token_hash,
            previous: row.previous.map(Box::new),
            group: row.group.map(Arc::from),
            parent: row.parent.map(Arc::from),
        }
    }

    /// What a usage report says about the key.
    pub fn terms(&self) -> KeyTerms<'_> {
        KeyTerms {
            id: &self.id,
            name: &self.name,
            limits: self.limits,
            expires_at: self.expires_at,
            revoked: self.revoked,
        }
    }

    /// The secrets that open this key: its current one (until `i64::MAX`), and the one a
    /// rotation replaced while its grace lasts.
    pub fn secrets(&self) -> impl Iterator<Item = (TokenHash, i64)> + '_ {
        std::iter::once((self.token_hash, i64::MAX)).chain(self.previous.as_deref().copied())
    }

    /// Whether this key may be served by model `m` (allow-list and free-only).
    pub fn may_use_model(&self, m: usize, catalog: &Catalog) -> bool {
        let listed = self.allowed.as_ref().is_none_or(|bits| bits.get(m));
        listed && (!self.free_only || catalog.models()[m].free)
    }

    /// Whether the alias itself is visible to this key.
    pub fn may_use_alias(&self, alias: usize, chain: &[usize], catalog: &Catalog) -> bool {
        let listed = self.allowed.is_none() || self.allowed_aliases.get(alias);
        if listed && !self.free_only {
            return true;
        }
        chain.iter().any(|&m| self.may_use_model(m, catalog))
    }

    /// Resolves `name` for this key: 404 if unknown, 403 if nothing in it is allowed. For an
    /// alias, models the key may not use are dropped from the chain.
    pub fn resolve(&self, catalog: &Catalog, name: &str) -> Result<Chain, GateError> {
        let mut chain = Chain::default();
        match catalog.target(name) {
            None => return Err(GateError::ModelNotFound(name.to_string())),
            Some(Target::Model(m)) => {
                if self.may_use_model(m, catalog) {
                    chain.push(m);
                }
            }
            Some(Target::Alias(a)) => {
                let models = catalog.alias_models(a);
                if self.may_use_alias(a, models, catalog) {
                    for &m in models {
                        if self.may_use_model(m, catalog) {
                            chain.push(m);
                        }
                    }
                }
            }
        }
        if chain.is_empty() {
            return Err(GateError::ModelNotAllowed(name.to_string()));
        }
        Ok(chain)
    }

    /// Checks expiry and revocation (SPEC §2: 401 with the exact code).
    pub fn check_alive(&self, now: i64) -> Result<(), GateError> {
        if self.revoked {
            Err(GateError::TokenRevoked)
        } else if now >= self.expires_at {
            Err(GateError::TokenExpired)
        } else {
            Ok(())
        }
    }
}

/// A set of small indexes, inline (no pointer to chase) for catalogs of up to 128 entries.
#[derive(Debug, Clone)]
enum IndexBits {
    Inline(u128),
    Heap(Vec<u64>),
}

impl IndexBits {
    fn new(len: usize) -> IndexBits {
        if len <= 128 {
            IndexBits::Inline(0)
        } else {
            IndexBits::Heap(vec![0; len.div_ceil(64)])
        }
    }

    fn set(&mut self, i: usize) {
        match self {
            IndexBits::Inline(bits) if i < 128 => *bits |= 1 << i,
            IndexBits::Heap(words) if i / 64 < words.len() => words[i / 64] |= 1 << (i % 64),
            _ => {}
        }
    }

    fn get(&self, i: usize) -> bool {
        match self {
            IndexBits::Inline(bits) => i < 128 && bits & (1 << i) != 0,
            IndexBits::Heap(words) => words.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0),
        }
    }
}

/// Parses a duration like `30s`, `90m`, `1h`, `7d`, `2w` into seconds.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let bad = || format!("invalid duration \"{s}\": use a number with a unit, e.g. 1h, 7d, 90d");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(split);
    let n: i64 = num.parse().map_err(|_| bad())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("invalid unit in \"{s}\": use s, m, h, d or w")),
    };
    Ok(n.saturating_mul(unit_secs))
}

/// Parses a key lifetime and checks 1 h ..= 90 d.
pub fn parse_ttl(s: &str) -> Result<i64, String> {
    let secs = parse_duration(s)?;
    if !(MIN_TTL_SECS..=MAX_TTL_SECS).contains(&secs) {
        return Err(format!(
            "TTL \"{}\" is outside the allowed range of 1h to 90d",
            s.trim()
        ));
    }
    Ok(secs)
}

/// Reads a stored list: a JSON array, or the comma-joined form of databases written before
/// lists were stored as JSON. The empty list allocates nothing.
pub fn parse_list(s: &str) -> Vec<String> {
    if s == "[]" || s.is_empty() {
        return Vec::new();
    }
    if s.starts_with('[') {
        if let Ok(list) = serde_json::from_str(s) {
            return list;
        }
    }
    split_list(s)
}

/// Splits a comma list, dropping blanks.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tests::catalog;

    fn key(c: &Catalog, allowed: &[&str], free_only: bool) -> KeyEntry {
        let record = KeyRecord {
            allowed_models: allowed.iter().map(|s| s.to_string()).collect(),
            free_only,
            ..KeyRecord::for_test("key_1")
        };
        KeyEntry::new(record, c, Arc::new(KeyCounters::default()))
    }

    fn codes(c: &Catalog, k: &KeyEntry, name: &str) -> Result<usize, &'static str> {
        k.resolve(c, name).map(|ch| ch.len()).map_err(|e| e.code())
    }

    #[test]
    fn empty_allow_list_allows_everything_known() {
        let c = catalog();
        let k = key(&c, &[], false);
        assert_eq!(codes(&c, &k, "fast"), Ok(2));
        assert_eq!(codes(&c, &k, "paid"), Ok(1));
        assert_eq!(codes(&c, &k, "nope"), Err("model_not_found"));
    }

    #[test]
    fn allow_list_works_through_aliases() {
        let c = catalog();
        let k = key(&c, &["fast"], false);
        assert_eq!(codes(&c, &k, "fast"), Ok(2));
        assert_eq!(
            codes(&c, &k, "paid"),
            Ok(1),
            "reached through the allowed alias"
        );
        assert_eq!(codes(&c, &k, "other"), Err("model_not_allowed"));

        let k = key(&c, &["paid"], false);
        let chain = k.resolve(&c, "fast").unwrap();
        assert_eq!(
            (chain.len(), chain.get(0)),
            (1, Some(0)),
            "chain keeps only allowed models"
        );
        assert_eq!(codes(&c, &k, "free"), Err("model_not_allowed"));
    }

    #[test]
    fn free_only_admits_only_free_models() {
        let c = catalog();
        let k = key(&c, &[], true);
        assert_eq!(codes(&c, &k, "paid"), Err("model_not_allowed"));
        assert_eq!(codes(&c, &k, "free"), Ok(1));
        let chain = k.resolve(&c, "fast").unwrap();
        assert_eq!((chain.len(), chain.get(0)), (1, Some(1)));
    }

    #[test]
    fn ttl_range_is_one_hour_to_ninety_days() {
        assert_eq!(parse_ttl("1h"), Ok(3_600));
        assert_eq!(parse_ttl("90d"), Ok(90 * 86_400));
        assert_eq!(parse_ttl("60m"), Ok(3_600));
        assert!(parse_ttl("59m").is_err());
        assert!(parse_ttl("91d").is_err());
        assert!(parse_ttl("0h").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("10y").is_err());
        assert!(parse_ttl("99999999999999999999d").is_err());
    }

    #[test]
    fn scopes_grant_only_gate_scopes() {
        let s = ScopeSet::from_names(&["gate:chat", "job:run", "system:*"]);
        assert!(s.contains(ScopeSet::CHAT));
        assert!(!s.contains(ScopeSet::MODELS));
        assert!(!ScopeSet::from_names(&["job:*"]).contains(ScopeSet::USAGE));
    }

    fn entry(expires_at: i64, revoked_at: Option<i64>) -> KeyEntry {
        let yaml = r#"
listen: "127.0.0.1:8080"
database: "x.db"
providers: [{name: p, kind: openai, base_url: "http://127.0.0.1:1/v1"}]
models: [{id: m, provider: p, input_usd_per_mtok: 1, output_usd_per_mtok: 1}]
"#;
        let config = crate::config::Config::parse(yaml, std::path::Path::new("t.yaml")).unwrap();
        let catalog = Catalog::new(&config);
        let record = KeyRecord {
            budget_mode: BudgetMode::Hard,
            expires_at,
            revoked_at,
            ..KeyRecord::for_test("key_1")
        };
        KeyEntry::new(record, &catalog, Arc::new(KeyCounters::default()))
    }

    #[test]
    fn keys_stop_at_expires_at_with_a_moved_clock() {
        let expires = 1_000_000;
        let key = entry(expires, None);
        assert_eq!(key.check_alive(expires - 1), Ok(()));
        assert_eq!(key.check_alive(expires), Err(GateError::TokenExpired));
        assert_eq!(
            key.check_alive(expires + 86_400_000),
            Err(GateError::TokenExpired)
        );
        // Revocation wins over expiry and applies at once.
        let revoked = entry(expires, Some(5));
        assert_eq!(revoked.check_alive(0), Err(GateError::TokenRevoked));
        assert_eq!(
            revoked.check_alive(expires + 1),
            Err(GateError::TokenRevoked)
        );
    }
}
