//! Key management: the one typed door behind the CLI, the admin API and the dashboard.
//! Every validation rule lives here, with one error type, so no door can accept what
//! another refuses. Doors only turn their input (flags, JSON) into [`KeySpec`] or
//! [`KeyChanges`], keeping numbers signed so that `-5` reaches the rule that explains it.
//! Every change it makes is also written to the audit log, with the door's [`Actor`].

mod fleet;

pub use fleet::{GroupChanges, GroupSpec, MAX_MINTS_PER_MINUTE};

use std::borrow::Cow;
use std::fmt;

use crate::audit::{self, key_view, Actor};
use crate::catalog::Catalog;
use crate::keys::token;
use crate::keys::{
    ends_after, parse_duration, BudgetMode, KeyRecord, DEFAULT_SCOPES, DEFAULT_TTL_SECS,
    MAX_TTL_SECS, MIN_TTL_SECS,
};
use crate::money::Nanos;
use crate::store::{KeyPatch, Store, StoreError, TraceRow};

/// Longest grace period of a rotated secret.
pub const MAX_GRACE_SECS: i64 = 7 * 86_400;
/// Grace period of a rotated secret when none is given.
pub const DEFAULT_GRACE: &str = "1h";
const MAX_NAME_CHARS: usize = 100;
const MAX_SCOPE_CHARS: usize = 64;
const MAX_CLIENT_ID_CHARS: usize = 200;

/// A key to create, as a door received it. `None` limits mean unlimited.
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    pub name: String,
    pub rpm: Option<i64>,
    pub rpd: Option<i64>,
    pub max_inflight: Option<i64>,
    pub budget_usd: Option<f64>,
    pub budget_mode: Option<String>,
    pub allowed_models: Vec<String>,
    pub free_only: bool,
    /// `None` or empty: the default scopes.
    pub scopes: Option<Vec<String>>,
    /// `1h`..`90d`; `None`: 30 days.
    pub ttl: Option<String>,
    pub client_id: Option<String>,
    /// The group the key joins (it must exist).
    pub group: Option<String>,
    /// Runaway-agent brakes (SPEC §7); `None`: no limit.
    pub max_usd_per_hour: Option<f64>,
    pub loop_limit: Option<i64>,
}

/// Changes to a key: `None` leaves a field alone, `Some(None)` clears a limit.
#[derive(Debug, Clone, Default)]
pub struct KeyChanges {
    pub name: Option<String>,
    pub rpm: Option<Option<i64>>,
    pub rpd: Option<Option<i64>>,
    pub max_inflight: Option<Option<i64>>,
    pub budget_usd: Option<Option<f64>>,
    pub budget_mode: Option<String>,
    pub allowed_models: Option<Vec<String>>,
    pub free_only: Option<bool>,
    pub scopes: Option<Vec<String>>,
    /// A new lifetime, counted from now.
    pub ttl: Option<String>,
    pub client_id: Option<Option<String>>,
    /// `Some(None)` takes the key out of its group.
    pub group: Option<Option<String>>,
    pub max_usd_per_hour: Option<Option<f64>>,
    pub loop_limit: Option<Option<i64>>,
}

/// Why a key operation was refused.
#[derive(Debug)]
pub enum KeyError {
    /// A field's value breaks a rule; `field` is the API name of the field (or the name the
    /// caller sent, for a field that does not exist).
    Invalid {
        field: Cow<'static, str>,
        message: String,
    },
    NotFound(String),
    /// Something other than a key was not found (the message says what).
    NotFoundWhat(String),
    /// Beyond what the caller holds (a child key asking for more than its parent has);
    /// `field` names what reached too far, where one field did.
    Forbidden {
        field: Option<&'static str>,
        message: String,
    },
    /// The operation does not apply to the key as it is (rotating a revoked key).
    Conflict(String),
    Store(StoreError),
}

impl KeyError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> KeyError {
        KeyError::Invalid {
            field: Cow::Borrowed(field),
            message: message.into(),
        }
    }

    /// A body field the API does not have, named as sent (cut to a readable length).
    pub fn unknown_field(name: &str, known: &[&str]) -> KeyError {
        let name: String = name.chars().take(64).collect();
        KeyError::Invalid {
            message: format!(
                "unknown field \"{name}\"; the fields are {}",
                known.join(", ")
            ),
            field: Cow::Owned(name),
        }
    }

    /// A refusal for reaching past what the caller (or a parent key) holds.
    pub fn forbidden(field: Option<&'static str>, message: impl Into<String>) -> KeyError {
        KeyError::Forbidden {
            field,
            message: message.into(),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            KeyError::Invalid { .. } => 400,
            KeyError::NotFound(_) | KeyError::NotFoundWhat(_) => 404,
            KeyError::Forbidden { .. } => 403,
            KeyError::Conflict(_) => 409,
            KeyError::Store(_) => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            KeyError::Invalid { .. } => "invalid_request",
            KeyError::NotFound(_) | KeyError::NotFoundWhat(_) => "not_found",
            KeyError::Forbidden { .. } => "insufficient_scope",
            KeyError::Conflict(_) => "conflict",
            KeyError::Store(_) => "store_error",
        }
    }

    /// The field a refusal is about, for the dashboard to show the message beside it.
    pub fn field(&self) -> Option<&str> {
        match self {
            KeyError::Invalid { field, .. } => Some(field),
            KeyError::Forbidden { field, .. } => field.as_deref(),
            KeyError::NotFound(_)
            | KeyError::NotFoundWhat(_)
            | KeyError::Conflict(_)
            | KeyError::Store(_) => None,
        }
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Invalid { message, .. } => f.write_str(message),
            KeyError::NotFound(id) => write!(f, "no key with id \"{id}\""),
            KeyError::Forbidden { message: why, .. } | KeyError::NotFoundWhat(why) => {
                f.write_str(why)
            }
            KeyError::Conflict(why) => f.write_str(why),
            KeyError::Store(e) => write!(f, "database: {e}"),
        }
    }
}

impl std::error::Error for KeyError {}

impl From<StoreError> for KeyError {
    fn from(e: StoreError) -> KeyError {
        KeyError::Store(e)
    }
}

/// Key operations over one store and the config's catalog.
pub struct KeyService<'a> {
    store: &'a mut Store,
    catalog: &'a Catalog,
    /// Who is making changes through this service, for the audit log.
    actor: Actor,
}

impl<'a> KeyService<'a> {
    pub fn new(store: &'a mut Store, catalog: &'a Catalog, actor: Actor) -> KeyService<'a> {
        KeyService {
            store,
            catalog,
            actor,
        }
    }

    fn record(
        &mut self,
        action: &str,
        id: &str,
        before: Option<&KeyRecord>,
        after: &KeyRecord,
        now: i64,
    ) {
        audit::record(
            self.store,
            &self.actor,
            action,
            id,
            before.map(key_view),
            Some(key_view(after)),
            now,
        );
    }

    /// Validates and stores a new key. Returns the record and the secret, which exists only
    /// in this return value: the store keeps its SHA-256.
    pub fn create(&mut self, spec: KeySpec, now: i64) -> Result<(KeyRecord, String), KeyError> {
        let group = spec
            .group
            .as_deref()
            .map(|g| self.check_group(g))
            .transpose()?;
        let (mut record, secret) = mint(self.catalog, spec, now)?;
        record.group = group;
        self.store.insert_key(&record)?;
        self.record("key.create", &record.id.clone(), None, &record, now);
        Ok((record, secret))
    }

    /// Validates and applies changes to the key in one transaction, then brings its
    /// descendants within it ([`Self::narrow_descendants`]).
    pub fn update(
        &mut self,
        id: &str,
        changes: KeyChanges,
        now: i64,
    ) -> Result<KeyRecord, KeyError> {
        let mut patch = KeyPatch {
            name: changes.name.as_deref().map(check_name).transpose()?,
            scopes: changes.scopes.map(check_scopes).transpose()?,
            rpm: changes.rpm.map(|v| check_limit("rpm", v)).transpose()?,
            rpd: changes.rpd.map(|v| check_limit("rpd", v)).transpose()?,
            max_inflight: changes
                .max_inflight
                .map(|v| check_limit("max_inflight", v))
                .transpose()?,
            budget: changes.budget_usd.map(check_budget).transpose()?,
            budget_mode: changes
                .budget_mode
                .as_deref()
                .map(check_budget_mode)
                .transpose()?,
            allowed_models: changes
                .allowed_models
                .map(|m| check_models(self.catalog, m))
                .transpose()?,
            free_only: changes.free_only,
            client_id: changes.client_id.map(check_client_id).transpose()?,
            expires_at: changes
                .ttl
                .as_deref()
                .map(|t| check_ttl(t).map(|secs| ends_after(now, secs)))
                .transpose()?,
            group: match changes.group {
                Some(Some(g)) => Some(Some(self.check_group(&g)?)),
                Some(None) => Some(None),
                None => None,
            },
            max_usd_per_hour: changes
                .max_usd_per_hour
                .map(check_usd_per_hour)
                .transpose()?,
            loop_limit: changes.loop_limit.map(check_loop_limit).transpose()?,
        };
        let before = self.store.get_key(id)?;
        // A child stays within its parent whatever door changes it.
        if let Some(b) = before.as_ref().filter(|b| b.parent_id.is_some()) {
            let mut candidate = b.clone();
            patch.apply(&mut candidate);
            self.check_within_parent(&mut candidate, patch.group.is_some())?;
            if patch.expires_at.is_some() {
                patch.expires_at = Some(candidate.expires_at);
            }
        }
        let after = self
            .store
            .update_key(id, &patch)?
            .ok_or_else(|| KeyError::NotFound(id.to_string()))?;
        self.record("key.update", id, before.as_ref(), &after, now);
        self.narrow_descendants(&after, now)?;
        Ok(after)
    }

    /// Issues a new secret for the same key. The old secret keeps working for `grace`
    /// (`0s`..`7d`, default 1 h), then gets 401 `token_revoked`.
    pub fn rotate(
        &mut self,
        id: &str,
        grace: Option<&str>,
        now: i64,
    ) -> Result<(KeyRecord, String), KeyError> {
        let grace_secs = check_grace(grace.unwrap_or(DEFAULT_GRACE))?;
        let key = self.get(id)?;
        if key.revoked_at.is_some() {
            return Err(KeyError::Conflict(format!(
                "key \"{id}\" is revoked; create a new key instead"
            )));
        }
        // A key keeps one earlier secret. Another rotation with a grace would end the one
        // still in its grace before the end it was promised; with no grace, every earlier
        // secret ends now, which is what an operator replacing a leaked secret wants.
        if let Some(until) = key
            .previous_valid_until
            .filter(|&u| u > now && grace_secs > 0)
        {
            return Err(KeyError::Conflict(format!(
                "the secret replaced by the last rotation works until {}; rotate again after \
                 that, or with a grace of 0s to end every earlier secret now",
                crate::clock::rfc3339(until)
            )));
        }
        let minted = token::mint().map_err(random_source)?;
        let record = self
            .store
            .rotate_key(
                id,
                &minted.hash,
                &minted.prefix,
                ends_after(now, grace_secs),
                now,
            )?
            .ok_or_else(|| KeyError::NotFound(id.to_string()))?;
        self.record("key.rotate", id, Some(&key), &record, now);
        Ok((record, minted.secret))
    }

    /// Revokes a key now (idempotent: the first revocation time is kept).
    pub fn revoke(&mut self, id: &str, now: i64) -> Result<KeyRecord, KeyError> {
        let before = self.store.get_key(id)?;
        // The key's live descendants are revoked with it (SPEC §7): each is a change too.
        let cascade: Vec<KeyRecord> = self
            .store
            .descendants(id)?
            .into_iter()
            .filter(|k| k.revoked_at.is_none())
            .collect();
        let after = self
            .store
            .revoke_key(id, now)?
            .ok_or_else(|| KeyError::NotFound(id.to_string()))?;
        // A repeated revocation changes nothing, and is not a change to record.
        if before.as_ref().is_none_or(|b| b.revoked_at.is_none()) {
            self.record("key.revoke", id, before.as_ref(), &after, now);
        }
        for child in cascade {
            if let Some(revoked) = self.store.get_key(&child.id)? {
                if revoked.revoked_at.is_some() {
                    self.record("key.revoke", &child.id, Some(&child), &revoked, now);
                }
            }
        }
        Ok(after)
    }

    pub fn get(&self, id: &str) -> Result<KeyRecord, KeyError> {
        self.store
            .get_key(id)?
            .ok_or_else(|| KeyError::NotFound(id.to_string()))
    }

    /// The audit log, newest first (read through the same door as the changes it records).
    pub fn audit_log(
        &self,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<crate::store::AuditEntry>, KeyError> {
        Ok(self.store.audit(limit, before)?)
    }

    /// Active keys, or every key with `all`.
    pub fn list(&self, all: bool, now: i64) -> Result<Vec<KeyRecord>, KeyError> {
        Ok(self
            .store
            .all_keys()?
            .into_iter()
            .filter(|k| all || k.status(now) == "active")
            .collect())
    }

    /// One page of the keys matching `filter` and how many match (the admin list with
    /// `limit`, `offset`, `q`, `status`, `parent` or `group`).
    pub fn page(
        &self,
        filter: &crate::store::KeyFilter,
        now: i64,
    ) -> Result<crate::store::KeyPage, KeyError> {
        Ok(self.store.key_page(filter, now)?)
    }

    /// Newest traces first, for one key or all, `before` a trace id for paging.
    pub fn traces(
        &self,
        key: Option<&str>,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<TraceRow>, KeyError> {
        if let Some(id) = key {
            self.get(id)?;
        }
        Ok(self.store.traces(key, limit.min(10_000), before)?)
    }
}

/// Validates a spec and mints the key without storing it (bulk provisioning, benchmarks).
pub fn mint(catalog: &Catalog, spec: KeySpec, now: i64) -> Result<(KeyRecord, String), KeyError> {
    let name = check_name(&spec.name)?;
    let rpm = check_limit("rpm", spec.rpm)?;
    let rpd = check_limit("rpd", spec.rpd)?;
    let max_inflight = check_limit("max_inflight", spec.max_inflight)?;
    let budget = check_budget(spec.budget_usd)?;
    let budget_mode = match spec.budget_mode.as_deref() {
        Some(m) => check_budget_mode(m)?,
        None => BudgetMode::Hard,
    };
    let allowed_models = check_models(catalog, spec.allowed_models)?;
    let ttl = match spec.ttl.as_deref() {
        Some(t) => check_ttl(t)?,
        None => DEFAULT_TTL_SECS,
    };
    // Without a list, the defaults; an empty list is a mistake, not "the defaults" (a key
    // with no scope could do nothing).
    let scopes = match spec.scopes {
        Some(s) => check_scopes(s)?,
        None => DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect(),
    };
    let client_id = check_client_id(spec.client_id)?;
    let max_usd_per_hour = check_usd_per_hour(spec.max_usd_per_hour)?;
    let loop_limit = check_loop_limit(spec.loop_limit)?;
    let minted = token::mint().map_err(random_source)?;
    let record = KeyRecord {
        id: token::new_key_id().map_err(random_source)?,
        name,
        prefix: minted.prefix,
        token_hash: minted.hash,
        scopes,
        rpm,
        rpd,
        budget,
        budget_mode,
        max_inflight,
        allowed_models,
        free_only: spec.free_only,
        client_id,
        // On the second, as the expiry: `expires_at - created_at` is the TTL asked for.
        created_at: ends_after(now, 0),
        expires_at: ends_after(now, ttl),
        revoked_at: None,
        last_used_at: None,
        previous_hash: None,
        previous_valid_until: None,
        rotated_at: None,
        group: None,
        parent_id: None,
        max_usd_per_hour,
        loop_limit,
    };
    Ok((record, minted.secret))
}

/// Every allow-list entry must name a model or alias of the config.
fn check_models(catalog: &Catalog, names: Vec<String>) -> Result<Vec<String>, KeyError> {
    for n in &names {
        if catalog.model_index(n).is_none() && catalog.alias_chain(n).is_none() {
            return Err(KeyError::invalid(
                "allowed_models",
                format!("unknown model or alias \"{n}\" in the allow-list"),
            ));
        }
    }
    Ok(names)
}

fn random_source(e: std::io::Error) -> KeyError {
    KeyError::Store(StoreError::Other(format!(
        "cannot read the OS random source: {e}"
    )))
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn check_name(name: &str) -> Result<String, KeyError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(KeyError::invalid("name", "name must not be empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS || has_control(name) {
        return Err(KeyError::invalid(
            "name",
            format!("name must be at most {MAX_NAME_CHARS} printable characters"),
        ));
    }
    Ok(name.to_string())
}

/// A limit is a whole number from 1 up, or absent (unlimited).
fn check_limit(field: &'static str, v: Option<i64>) -> Result<Option<u32>, KeyError> {
    match v {
        None => Ok(None),
        Some(n) if n >= 1 && n <= u32::MAX as i64 => Ok(Some(n as u32)),
        Some(n) => Err(KeyError::invalid(
            field,
            format!(
                "{field} must be a whole number from 1 to {} (omit it for unlimited), got {n}",
                u32::MAX
            ),
        )),
    }
}

fn check_budget(usd: Option<f64>) -> Result<Option<Nanos>, KeyError> {
    match usd {
        None => Ok(None),
        Some(usd) => Nanos::from_usd(usd).map(Some).ok_or_else(|| {
            KeyError::invalid(
                "monthly_budget_usd",
                format!("invalid budget {usd}: use a USD amount between 0 and 1000000000"),
            )
        }),
    }
}

/// An hourly spend cap: a USD amount above 0, or absent (no cap).
fn check_usd_per_hour(usd: Option<f64>) -> Result<Option<Nanos>, KeyError> {
    match usd {
        None => Ok(None),
        Some(usd) => Nanos::from_usd(usd)
            .filter(|n| *n > Nanos::ZERO)
            .map(Some)
            .ok_or_else(|| {
                KeyError::invalid(
                    "max_usd_per_hour",
                    format!("max_usd_per_hour must be a USD amount above 0 and at most 1000000000 (omit it for no cap), got {usd}"),
                )
            }),
    }
}

/// Most identical requests a `loop_limit` may allow per minute: the loop table counts per
/// second in 16 bits, so every limit up to this one is counted exactly.
pub const MAX_LOOP_LIMIT: i64 = 10_000;

fn check_loop_limit(v: Option<i64>) -> Result<Option<u32>, KeyError> {
    match v {
        None => Ok(None),
        Some(n) if (1..=MAX_LOOP_LIMIT).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(KeyError::invalid(
            "loop_limit",
            format!("loop_limit must be a whole number from 1 to {MAX_LOOP_LIMIT} (omit it for no limit), got {n}"),
        )),
    }
}

fn check_budget_mode(mode: &str) -> Result<BudgetMode, KeyError> {
    BudgetMode::parse(mode).ok_or_else(|| {
        KeyError::invalid(
            "budget_mode",
            format!("budget_mode must be \"soft\" or \"hard\", got \"{mode}\""),
        )
    })
}

/// Scopes are stored as given (unknown ones grant nothing); each is a short printable word.
fn check_scopes(scopes: Vec<String>) -> Result<Vec<String>, KeyError> {
    if scopes.is_empty() {
        return Err(KeyError::invalid(
            "scopes",
            "a key needs at least one scope",
        ));
    }
    for s in &scopes {
        if s.is_empty()
            || s.chars().count() > MAX_SCOPE_CHARS
            || s.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(KeyError::invalid(
                "scopes",
                format!("invalid scope \"{s}\": up to {MAX_SCOPE_CHARS} characters, no spaces"),
            ));
        }
    }
    Ok(scopes)
}

fn check_ttl(ttl: &str) -> Result<i64, KeyError> {
    let secs = parse_duration(ttl).map_err(|e| KeyError::invalid("ttl", e))?;
    if !(MIN_TTL_SECS..=MAX_TTL_SECS).contains(&secs) {
        return Err(KeyError::invalid(
            "ttl",
            format!("TTL \"{ttl}\" is outside the allowed range of 1h to 90d"),
        ));
    }
    Ok(secs)
}

fn check_grace(grace: &str) -> Result<i64, KeyError> {
    let secs = parse_duration(grace).map_err(|e| KeyError::invalid("grace", e))?;
    if !(0..=MAX_GRACE_SECS).contains(&secs) {
        return Err(KeyError::invalid(
            "grace",
            format!("grace \"{grace}\" is outside the allowed range of 0s to 7d"),
        ));
    }
    Ok(secs)
}

/// An empty client id clears the field.
fn check_client_id(id: Option<String>) -> Result<Option<String>, KeyError> {
    match id {
        Some(c) if c.chars().count() > MAX_CLIENT_ID_CHARS || has_control(&c) => {
            Err(KeyError::invalid(
                "client_id",
                format!("client_id must be at most {MAX_CLIENT_ID_CHARS} printable characters"),
            ))
        }
        Some(c) if c.is_empty() => Ok(None),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn catalog() -> Catalog {
        let yaml = r#"
listen: "127.0.0.1:8080"
database: "x.db"
providers: [{name: p, kind: openai, base_url: "http://127.0.0.1:1/v1"}]
models: [{id: m, provider: p, input_usd_per_mtok: 1, output_usd_per_mtok: 1}]
aliases: {fast: [m]}
"#;
        Catalog::new(&crate::config::Config::parse(yaml, Path::new("t.yaml")).unwrap())
    }

    /// SHA-256 by coreutils' `sha256sum`, not by the gateway's own hashing.
    fn independent_sha256(text: &str) -> token::TokenHash {
        use std::io::Write;
        let mut child = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sha256sum");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("sha256sum output");
        let hex = String::from_utf8(out.stdout).expect("utf-8");
        let mut digest = [0u8; 32];
        for (i, b) in digest.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
        }
        digest
    }

    fn service_test(f: impl FnOnce(&mut KeyService<'_>)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("k.db")).unwrap();
        let catalog = catalog();
        let mut svc = KeyService::new(&mut store, &catalog, Actor::cli());
        f(&mut svc);
    }

    fn spec() -> KeySpec {
        KeySpec {
            name: "agent".into(),
            ..KeySpec::default()
        }
    }

    fn refused_field(r: Result<(KeyRecord, String), KeyError>) -> String {
        match r {
            Err(KeyError::Invalid { field, .. }) => field.into_owned(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_thirty_days_all_gate_scopes_and_a_hard_budget() {
        service_test(|svc| {
            let (k, secret) = svc.create(spec(), 1_000).unwrap();
            assert_eq!(k.expires_at, 1_000 + DEFAULT_TTL_SECS * 1000);
            assert_eq!(k.scopes, DEFAULT_SCOPES);
            assert_eq!(k.budget_mode, BudgetMode::Hard);
            assert!(secret.starts_with("spideriq_pat_"));
            assert_eq!(svc.list(false, 1_000).unwrap().len(), 1);
        });
    }

    #[test]
    fn a_name_is_required_and_printable() {
        let c = catalog();
        for name in ["", "   ", "a\u{7}b"] {
            let s = KeySpec {
                name: name.into(),
                ..KeySpec::default()
            };
            assert_eq!(refused_field(mint(&c, s, 0)), "name");
        }
        let long = KeySpec {
            name: "x".repeat(101),
            ..KeySpec::default()
        };
        assert_eq!(refused_field(mint(&c, long, 0)), "name");
    }

    #[test]
    fn limits_are_whole_numbers_from_one() {
        let c = catalog();
        for v in [0, -5, u32::MAX as i64 + 1] {
            let s = KeySpec {
                rpm: Some(v),
                ..spec()
            };
            assert_eq!(refused_field(mint(&c, s, 0)), "rpm");
            let s = KeySpec {
                rpd: Some(v),
                ..spec()
            };
            assert_eq!(refused_field(mint(&c, s, 0)), "rpd");
            let s = KeySpec {
                max_inflight: Some(v),
                ..spec()
            };
            assert_eq!(refused_field(mint(&c, s, 0)), "max_inflight");
        }
    }

    #[test]
    fn budgets_are_finite_and_not_negative() {
        let c = catalog();
        for usd in [-0.01, f64::NAN, f64::INFINITY, 2e9] {
            let s = KeySpec {
                budget_usd: Some(usd),
                ..spec()
            };
            assert_eq!(refused_field(mint(&c, s, 0)), "monthly_budget_usd");
        }
        let s = KeySpec {
            budget_mode: Some("firm".into()),
            ..spec()
        };
        assert_eq!(refused_field(mint(&c, s, 0)), "budget_mode");
    }

    #[test]
    fn the_allow_list_names_known_models_or_aliases() {
        let c = catalog();
        let s = KeySpec {
            allowed_models: vec!["m".into(), "fast".into()],
            ..spec()
        };
        assert!(mint(&c, s, 0).is_ok());
        let s = KeySpec {
            allowed_models: vec!["gpt-nope".into()],
            ..spec()
        };
        assert_eq!(refused_field(mint(&c, s, 0)), "allowed_models");
    }

    #[test]
    fn ttl_is_one_hour_to_ninety_days() {
        let c = catalog();
        for ttl in ["59m", "91d", "0h", "soon"] {
            let s = KeySpec {
                ttl: Some(ttl.into()),
                ..spec()
            };
            assert_eq!(refused_field(mint(&c, s, 0)), "ttl");
        }
    }

    #[test]
    fn scopes_are_printable_words_and_a_comma_stays_inside_one() {
        let c = catalog();
        let s = KeySpec {
            scopes: Some(vec!["gate chat".into()]),
            ..spec()
        };
        assert_eq!(refused_field(mint(&c, s, 0)), "scopes");
        let s = KeySpec {
            scopes: Some(vec!["x,gate:chat".into()]),
            ..spec()
        };
        assert_eq!(mint(&c, s, 0).unwrap().0.scopes, vec!["x,gate:chat"]);
    }

    #[test]
    fn client_ids_are_printable_and_empty_clears() {
        let c = catalog();
        let s = KeySpec {
            client_id: Some("x".repeat(201)),
            ..spec()
        };
        assert_eq!(refused_field(mint(&c, s, 0)), "client_id");
        let s = KeySpec {
            client_id: Some(String::new()),
            ..spec()
        };
        assert_eq!(mint(&c, s, 0).unwrap().0.client_id, None);
    }

    #[test]
    fn updates_follow_the_same_rules_and_change_nothing_when_refused() {
        service_test(|svc| {
            let (k, _) = svc.create(spec(), 0).unwrap();
            let bad = KeyChanges {
                rpm: Some(Some(0)),
                rpd: Some(Some(10)),
                ..KeyChanges::default()
            };
            assert_eq!(svc.update(&k.id, bad, 0).unwrap_err().field(), Some("rpm"));
            assert_eq!(svc.get(&k.id).unwrap().rpd, None, "nothing applied");
            let bad = KeyChanges {
                scopes: Some(vec![]),
                ..KeyChanges::default()
            };
            assert_eq!(
                svc.update(&k.id, bad, 0).unwrap_err().field(),
                Some("scopes")
            );
            let ok = KeyChanges {
                rpm: Some(None),
                rpd: Some(Some(10)),
                ttl: Some("2h".into()),
                ..KeyChanges::default()
            };
            let k = svc.update(&k.id, ok, 5).unwrap();
            assert_eq!(
                (k.rpm, k.rpd, k.expires_at),
                // Two hours on, cut to the whole second that is shown.
                (None, Some(10), 7_200_000)
            );
            let missing = svc.update("key_nope", KeyChanges::default(), 0);
            assert_eq!(missing.unwrap_err().status(), 404);
        });
    }

    #[test]
    fn an_expiry_falls_on_the_whole_second_it_shows() {
        service_test(|svc| {
            let ttl = KeySpec {
                ttl: Some("1h".into()),
                ..spec()
            };
            let (k, _) = svc.create(ttl, 1_234_567).unwrap();
            assert_eq!(k.expires_at, 4_834_000);
            let (r, _) = svc.rotate(&k.id, Some("30s"), 1_500_999).unwrap();
            assert_eq!(r.previous_valid_until, Some(1_530_000));
            let shown = crate::clock::rfc3339(k.expires_at);
            assert_eq!(shown, "1970-01-01T01:20:34Z");
        });
    }

    #[test]
    fn a_child_cut_below_an_hour_by_its_parents_end_is_not_minted() {
        service_test(|svc| {
            let parent = KeySpec {
                ttl: Some("1h".into()),
                ..spec()
            };
            let (p, _) = svc.create(parent, 0).unwrap();
            // The same hour asked half a minute later is clamped to the parent's end.
            let (c, _) = svc.create_child(&p.id, spec(), 30_000).unwrap();
            assert_eq!(c.expires_at, p.expires_at);
            // Ten minutes before the parent ends, no key can live an hour.
            let late = svc.create_child(&p.id, spec(), 3_000_000);
            assert_eq!(refused_field(late), "ttl");
            let late = KeySpec {
                ttl: Some("1h".into()),
                ..spec()
            };
            assert_eq!(
                refused_field(svc.create_child(&p.id, late, 3_000_000)),
                "ttl"
            );
        });
    }

    #[test]
    fn rotation_keeps_the_id_and_bounds_the_grace() {
        service_test(|svc| {
            let (k, old) = svc.create(spec(), 0).unwrap();
            assert_eq!(
                svc.rotate(&k.id, Some("8d"), 0).unwrap_err().field(),
                Some("grace")
            );
            let (r, new) = svc.rotate(&k.id, Some("30s"), 1_000).unwrap();
            assert_eq!(r.id, k.id);
            assert_ne!(new, old);
            assert_eq!(r.token_hash, independent_sha256(&new));
            assert_eq!(r.previous_hash, Some(k.token_hash));
            assert_eq!(r.previous_valid_until, Some(31_000));
            // Another rotation within that grace would cut it short: refused, nothing changes.
            let e = svc.rotate(&k.id, Some("1h"), 2_000).unwrap_err();
            assert_eq!(e.status(), 409, "{e}");
            assert_eq!(svc.get(&k.id).unwrap().token_hash, r.token_hash);
            // After it, or with no grace (every earlier secret ends now), it is done.
            let (r2, _) = svc.rotate(&k.id, Some("0s"), 2_000).unwrap();
            assert_eq!(r2.previous_hash, Some(r.token_hash));
            assert_eq!(r2.previous_valid_until, Some(2_000));
            let (r3, _) = svc.rotate(&k.id, Some("1h"), 2_000).unwrap();
            assert_eq!(r3.previous_hash, Some(r2.token_hash));
            svc.revoke(&k.id, 3_000).unwrap();
            assert_eq!(svc.rotate(&k.id, None, 4_000).unwrap_err().status(), 409);
        });
    }
}
