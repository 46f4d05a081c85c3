//! Fleets through the key service (SPEC §7): groups, and child keys minted by agents. The
//! same rules whichever door asks: the CLI and admin API for groups, an agent's own key
//! (`/v1/keys`, scope `gate:keys`) for its children.

use serde_json::{json, Value};

use super::{
    check_budget, check_budget_mode, check_limit, check_models, check_scopes, check_ttl, mint,
    KeyError, KeyService, KeySpec,
};
use crate::fleet::MAX_DEPTH;
use crate::keys::{
    ends_after, BudgetMode, KeyRecord, DEFAULT_SCOPES, DEFAULT_TTL_SECS, MIN_TTL_SECS,
};
use crate::money::Nanos;
use crate::store::{GroupPatch, GroupRecord, KeyPatch};

/// Whether a narrowing (`KeyService::narrowing`) changes nothing.
fn narrows_nothing(p: &KeyPatch) -> bool {
    p.expires_at.is_none()
        && p.free_only.is_none()
        && p.scopes.is_none()
        && p.allowed_models.is_none()
        && p.group.is_none()
}

/// The refusal of a mint under a key that is not active (expired or revoked).
fn cannot_mint(parent_id: &str, status: &str) -> KeyError {
    KeyError::forbidden(
        None,
        format!("key \"{parent_id}\" is {status} and cannot mint keys"),
    )
}

/// Keys one parent may mint per minute (per node): an agent in a loop cannot flood the
/// store with keys.
pub const MAX_MINTS_PER_MINUTE: u32 = 60;
const MAX_GROUP_NAME_CHARS: usize = 64;
/// A child's TTL that would outlive its parent by at most this is cut to the parent's expiry.
const TTL_SLACK_MS: i64 = 60_000;

/// A group to create, as a door received it.
#[derive(Debug, Clone, Default)]
pub struct GroupSpec {
    pub name: String,
    pub budget_usd: Option<f64>,
    pub budget_mode: Option<String>,
    pub rpm: Option<i64>,
}

/// Changes to a group: `None` leaves a field alone, `Some(None)` clears a limit.
#[derive(Debug, Clone, Default)]
pub struct GroupChanges {
    pub budget_usd: Option<Option<f64>>,
    pub budget_mode: Option<String>,
    pub rpm: Option<Option<i64>>,
}

/// A group's public fields, for the audit log and the views.
pub fn group_view(g: &GroupRecord) -> Value {
    json!({
        "name": g.name,
        "budget_usd": g.budget.map(Nanos::as_usd),
        "budget_mode": g.budget_mode.as_str(),
        "rpm": g.rpm,
    })
}

/// Group names are short words: letters, digits, `.`, `_`, `-` (they appear in URLs).
fn check_group_name(name: &str) -> Result<String, KeyError> {
    let name = name.trim();
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_GROUP_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(KeyError::invalid(
            "name",
            format!(
                "group name \"{name}\" must be 1 to {MAX_GROUP_NAME_CHARS} letters, digits, '.', '_' or '-'"
            ),
        ))
    }
}

fn group_budget(usd: Option<f64>) -> Result<Option<Nanos>, KeyError> {
    check_budget(usd).map_err(|e| match e {
        KeyError::Invalid { message, .. } => KeyError::invalid("budget_usd", message),
        other => other,
    })
}

impl KeyService<'_> {
    /// The name of an existing group (400 naming `group` otherwise).
    pub(super) fn check_group(&self, name: &str) -> Result<String, KeyError> {
        match self.store.get_group(name.trim())? {
            Some(g) => Ok(g.name),
            None => Err(KeyError::invalid(
                "group",
                format!("no group named \"{}\"", name.trim()),
            )),
        }
    }

    pub fn create_group(&mut self, spec: GroupSpec, now: i64) -> Result<GroupRecord, KeyError> {
        let g = GroupRecord {
            name: check_group_name(&spec.name)?,
            budget: group_budget(spec.budget_usd)?,
            budget_mode: match spec.budget_mode.as_deref() {
                Some(m) => check_budget_mode(m)?,
                None => BudgetMode::Hard,
            },
            rpm: check_limit("rpm", spec.rpm)?,
            created_at: now,
        };
        if !self.store.insert_group(&g)? {
            return Err(KeyError::Conflict(format!(
                "a group named \"{}\" exists",
                g.name
            )));
        }
        self.audit(
            "group.create",
            &g.name.clone(),
            None,
            Some(group_view(&g)),
            now,
        );
        Ok(g)
    }

    pub fn update_group(
        &mut self,
        name: &str,
        changes: GroupChanges,
        now: i64,
    ) -> Result<GroupRecord, KeyError> {
        let patch = GroupPatch {
            budget: changes.budget_usd.map(group_budget).transpose()?,
            budget_mode: changes
                .budget_mode
                .as_deref()
                .map(check_budget_mode)
                .transpose()?,
            rpm: changes.rpm.map(|v| check_limit("rpm", v)).transpose()?,
        };
        let before = self.get_group(name)?;
        let after = self
            .store
            .update_group(name, &patch)?
            .ok_or_else(|| group_not_found(name))?;
        self.audit(
            "group.update",
            name,
            Some(group_view(&before)),
            Some(group_view(&after)),
            now,
        );
        Ok(after)
    }

    /// Deletes a group; its keys stay, outside any group.
    pub fn delete_group(&mut self, name: &str, now: i64) -> Result<(), KeyError> {
        let before = self.get_group(name)?;
        if !self.store.delete_group(name)? {
            return Err(group_not_found(name));
        }
        self.audit("group.delete", name, Some(group_view(&before)), None, now);
        Ok(())
    }

    pub fn get_group(&self, name: &str) -> Result<GroupRecord, KeyError> {
        self.store
            .get_group(name)?
            .ok_or_else(|| group_not_found(name))
    }

    pub fn list_groups(&self) -> Result<Vec<GroupRecord>, KeyError> {
        Ok(self.store.all_groups()?)
    }

    /// A group's spend in `month` ("YYYY-MM") per model, from the ledger.
    pub fn group_spend(
        &self,
        name: &str,
        month: &str,
    ) -> Result<Vec<crate::limits::ModelTally>, KeyError> {
        Ok(self
            .store
            .group_spend(name, month)?
            .into_iter()
            .map(crate::limits::ModelTally::from)
            .collect())
    }

    /// Ids of a group's keys.
    pub fn group_members(&self, name: &str) -> Result<Vec<String>, KeyError> {
        Ok(self.store.group_members(name)?)
    }

    /// A key minted by the agent holding `parent_id` (SPEC §7): never more than its parent
    /// holds. Scopes beyond the parent's (or `gate:keys` not asked for) are 403
    /// `insufficient_scope`; models, expiry and depth beyond it are 400 naming the field. The
    /// child joins its parent's group and is free-only if its parent is.
    pub fn create_child(
        &mut self,
        parent_id: &str,
        mut spec: KeySpec,
        now: i64,
    ) -> Result<(KeyRecord, String), KeyError> {
        let parent = self.get(parent_id)?;
        if parent.status(now) != "active" {
            return Err(cannot_mint(parent_id, parent.status(now)));
        }
        // The new key's depth: the parent's ancestors, plus the parent, plus one.
        let mut depth = 1;
        let mut up = parent.parent_id.clone();
        while let Some(id) = up {
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(KeyError::invalid(
                    "parent",
                    format!(
                        "keys nest at most {MAX_DEPTH} levels below the key that began the tree"
                    ),
                ));
            }
            up = self.store.get_key(&id)?.and_then(|k| k.parent_id);
        }
        // Scopes: those asked for, or the default ones the parent holds. What is asked is
        // checked against the parent once the record is made (`within`, below).
        let scopes = match spec.scopes.take() {
            Some(asked) => check_scopes(asked)?,
            None => DEFAULT_SCOPES
                .iter()
                .filter(|s| parent.scopes.iter().any(|p| p == *s))
                .map(|s| s.to_string())
                .collect(),
        };
        if scopes.is_empty() {
            return Err(KeyError::forbidden(
                Some("scopes"),
                "the minting key holds none of the scopes a key needs",
            ));
        }
        // Models: without a list, the parent's (an empty list allows everything).
        let mut models = check_models(self.catalog, std::mem::take(&mut spec.allowed_models))?;
        if models.is_empty() {
            models = parent.allowed_models.clone();
        }
        // Expiry: without a TTL, the default or the parent's end, whichever comes first.
        let expires_at = match spec.ttl.as_deref() {
            Some(t) => ends_after(now, check_ttl(t)?),
            None => ends_after(now, DEFAULT_TTL_SECS).min(parent.expires_at),
        };
        spec.scopes = Some(scopes);
        spec.allowed_models = models;
        spec.free_only |= parent.free_only;
        spec.group = None;
        // A placeholder TTL passes `mint`'s check; the real expiry is set below.
        spec.ttl = None;
        let (mut record, secret) = mint(self.catalog, spec, now)?;
        record.expires_at = expires_at;
        record.parent_id = Some(parent.id.clone());
        record.group = parent.group.clone();
        self.within(&parent, &mut record, "minting key")?;
        // A key lives at least an hour (SPEC §1); one cut short by its parent's end is not
        // minted (a moment less is the same clamp as above: the same TTL as the parent's).
        if record.expires_at - now < MIN_TTL_SECS * 1000 - TTL_SLACK_MS {
            return Err(KeyError::invalid(
                "ttl",
                format!(
                    "the minting key expires at {}, sooner than the shortest lifetime of a key (1h)",
                    crate::clock::rfc3339(parent.expires_at)
                ),
            ));
        }
        self.store.insert_key(&record)?;
        self.record("key.create", &record.id.clone(), None, &record, now);
        let record = self.settle_minted(parent_id, record, now)?;
        Ok((record, secret))
    }

    /// A change to the parent may have committed between the read above and the insert: the
    /// change's own pass over the parent's descendants ([`Self::narrow_descendants`], or the
    /// revocation's cascade) listed them before this key existed, so it missed this key, which
    /// would then stay outside a group its parent joined, or active under a revoked parent.
    /// The parent is read again now that the key is stored: a change committed before this
    /// read is seen here and applied to the key; one committed after it finds the key in its
    /// own pass. A key whose parent was revoked meanwhile is revoked and not handed out.
    fn settle_minted(
        &mut self,
        parent_id: &str,
        record: KeyRecord,
        now: i64,
    ) -> Result<KeyRecord, KeyError> {
        let parent = self.get(parent_id)?;
        if parent.status(now) != "active" {
            if let Some(revoked) = self.store.revoke_key(&record.id, now)? {
                self.record("key.revoke", &record.id, Some(&record), &revoked, now);
            }
            return Err(cannot_mint(parent_id, parent.status(now)));
        }
        let patch = self.narrowing(&parent, &record);
        if narrows_nothing(&patch) {
            return Ok(record);
        }
        let after = self
            .store
            .update_key(&record.id, &patch)?
            .unwrap_or_else(|| record.clone());
        self.record("key.update", &record.id, Some(&record), &after, now);
        Ok(after)
    }

    /// A child key as an operator would leave it (`key`, the patch applied) stays within
    /// its parent, by the rules it was minted under (SPEC §7, [`Self::within`]). A key
    /// without a parent passes.
    ///
    /// `moves_group`: the change names a group. A child stays in its parent's (a group's
    /// budget bounds its keys' trees: a child moved out would spend outside it). Checked
    /// only then, so a child left elsewhere by an older release can still be edited.
    pub(super) fn check_within_parent(
        &self,
        key: &mut KeyRecord,
        moves_group: bool,
    ) -> Result<(), KeyError> {
        let Some(parent_id) = &key.parent_id else {
            return Ok(());
        };
        let Some(parent) = self.store.get_key(parent_id)? else {
            return Ok(());
        };
        if moves_group && key.group != parent.group {
            return Err(KeyError::invalid(
                "group",
                match &parent.group {
                    Some(g) => format!("a child key stays in its parent key's group \"{g}\""),
                    None => "a child key stays out of groups, as its parent key is".to_string(),
                },
            ));
        }
        self.within(&parent, key, "parent key")
    }

    /// The rules a child keeps against `parent`, at mint and at every later change: scopes
    /// the parent holds (403 `insufficient_scope`), models within its allow-list, an expiry no later than its
    /// (a moment later is clamped: the same TTL asked a moment after the parent was made),
    /// free-only if it is (400 naming the field). `parent_is` names the parent in errors.
    fn within(
        &self,
        parent: &KeyRecord,
        key: &mut KeyRecord,
        parent_is: &str,
    ) -> Result<(), KeyError> {
        if let Some(s) = key.scopes.iter().find(|s| !parent.scopes.contains(s)) {
            return Err(KeyError::forbidden(
                Some("scopes"),
                format!("scope \"{s}\" is not held by the {parent_is}"),
            ));
        }
        if !parent.allowed_models.is_empty() {
            if key.allowed_models.is_empty() {
                return Err(KeyError::invalid(
                    "allowed_models",
                    format!("an empty allow-list (every model) reaches past the {parent_is}'s"),
                ));
            }
            if let Some(m) = key
                .allowed_models
                .iter()
                .find(|m| !self.parent_allows(parent, m))
            {
                return Err(KeyError::invalid(
                    "allowed_models",
                    format!("\"{m}\" is not in the {parent_is}'s allow-list"),
                ));
            }
        }
        if key.expires_at > parent.expires_at {
            if key.expires_at - parent.expires_at > TTL_SLACK_MS {
                return Err(KeyError::invalid(
                    "ttl",
                    format!(
                        "the key would outlive the {parent_is}, which expires at {}",
                        crate::clock::rfc3339(parent.expires_at)
                    ),
                ));
            }
            key.expires_at = parent.expires_at;
        }
        if parent.free_only && !key.free_only {
            return Err(KeyError::invalid(
                "free_only",
                format!("the {parent_is} is free-only"),
            ));
        }
        Ok(())
    }

    /// After `root` changed, every live key below it is brought back within its own parent,
    /// as the rules above would have it minted (SPEC §7: a child never exceeds its parent,
    /// and expiring a key expires its descendants): an expiry no later than its parent's,
    /// free-only if the parent is, only the scopes and models the parent holds, and the
    /// parent's group. What the stores and every view show then matches what the gateway
    /// enforces at request time anyway. A key that would keep no scope or no model of its
    /// own is left as it is: the request-time narrowing refuses it everything.
    ///
    /// Each key is read again just before its change, so an edit made to it meanwhile is
    /// narrowed, not undone. Not one transaction with the parent's change: should the store
    /// fail half-way, or a key be minted under the old parent meanwhile, the keys left
    /// unchanged are still held within their parents at every request, and the next change
    /// of the parent narrows them.
    pub(super) fn narrow_descendants(
        &mut self,
        root: &KeyRecord,
        now: i64,
    ) -> Result<(), KeyError> {
        let mut pending: Vec<KeyRecord> = self
            .store
            .descendants(&root.id)?
            .into_iter()
            .filter(|k| k.revoked_at.is_none())
            .collect();
        let mut parents = std::collections::HashMap::new();
        parents.insert(root.id.clone(), root.clone());
        // Parents before their children, whatever order the store listed them in.
        while !pending.is_empty() {
            let before = pending.len();
            let mut later = Vec::new();
            for key in pending {
                let Some(parent) = key.parent_id.as_ref().and_then(|p| parents.get(p)) else {
                    later.push(key);
                    continue;
                };
                let Some(key) = self.store.get_key(&key.id)? else {
                    continue;
                };
                let patch = self.narrowing(parent, &key);
                let after = if narrows_nothing(&patch) {
                    key
                } else {
                    let after = self
                        .store
                        .update_key(&key.id, &patch)?
                        .unwrap_or_else(|| key.clone());
                    self.record("key.update", &key.id, Some(&key), &after, now);
                    after
                };
                parents.insert(after.id.clone(), after);
            }
            if later.len() == before {
                break;
            }
            pending = later;
        }
        Ok(())
    }

    /// What `key` must change to be within `parent` (see [`Self::narrow_descendants`]).
    fn narrowing(&self, parent: &KeyRecord, key: &KeyRecord) -> KeyPatch {
        let mut patch = KeyPatch::default();
        if key.expires_at > parent.expires_at {
            patch.expires_at = Some(parent.expires_at);
        }
        if parent.free_only && !key.free_only {
            patch.free_only = Some(true);
        }
        let scopes: Vec<String> = key
            .scopes
            .iter()
            .filter(|s| parent.scopes.contains(s))
            .cloned()
            .collect();
        if !scopes.is_empty() && scopes.len() < key.scopes.len() {
            patch.scopes = Some(scopes);
        }
        if !parent.allowed_models.is_empty() {
            if key.allowed_models.is_empty() {
                patch.allowed_models = Some(parent.allowed_models.clone());
            } else {
                let models: Vec<String> = key
                    .allowed_models
                    .iter()
                    .filter(|m| self.parent_allows(parent, m))
                    .cloned()
                    .collect();
                if !models.is_empty() && models.len() < key.allowed_models.len() {
                    patch.allowed_models = Some(models);
                }
            }
        }
        if key.group != parent.group {
            patch.group = Some(parent.group.clone());
        }
        patch
    }

    /// Whether `name` (a model or alias) is within the parent's allow-list: listed, or a
    /// model of an alias it lists.
    fn parent_allows(&self, parent: &KeyRecord, name: &str) -> bool {
        parent.allowed_models.iter().any(|p| {
            p == name
                || self.catalog.alias_chain(p).is_some_and(|chain| {
                    self.catalog
                        .model_index(name)
                        .is_some_and(|m| chain.contains(&m))
                })
        })
    }

    /// The keys below `parent_id`, oldest first.
    pub fn children(&self, parent_id: &str) -> Result<Vec<KeyRecord>, KeyError> {
        Ok(self.store.descendants(parent_id)?)
    }

    /// Revokes a key below `parent_id` (and its own descendants); any other key is 404, so
    /// an agent learns nothing about keys outside its tree.
    pub fn revoke_child(
        &mut self,
        parent_id: &str,
        id: &str,
        now: i64,
    ) -> Result<KeyRecord, KeyError> {
        let mine = self
            .store
            .descendants(parent_id)?
            .iter()
            .any(|k| k.id == id);
        if !mine {
            return Err(KeyError::NotFound(id.to_string()));
        }
        self.revoke(id, now)
    }

    fn audit(
        &mut self,
        action: &str,
        target: &str,
        before: Option<Value>,
        after: Option<Value>,
        now: i64,
    ) {
        crate::audit::record(self.store, &self.actor, action, target, before, after, now);
    }
}

fn group_not_found(name: &str) -> KeyError {
    KeyError::NotFoundWhat(format!("no group named \"{name}\""))
}
