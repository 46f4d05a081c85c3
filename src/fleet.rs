//! Fleets (SPEC §7) on the request path: the groups in the snapshot, and the levels above a
//! key (the keys that minted it, its group) that its admission also counts against.
//!
//! A lone key pays one `Option` test here. A minted key's ancestors are found by id in the
//! same snapshot at every request, so revoking or expiring a parent reaches its whole tree
//! as soon as the snapshot has the change (at most one key-poll interval), without writing
//! to every descendant first.

use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::Now;
use crate::error::GateError;
use crate::keys::{KeyEntry, KeySet};
use crate::limits::{KeyCounters, Level, Limits, ModelTally, Upline};
use crate::money::Nanos;
use crate::store::GroupRecord;

/// How far below its root key a minted key may be: a root (depth 0) and four generations.
pub const MAX_DEPTH: usize = 4;

/// A group as the request path sees it: its limits and its live counters (spend and holds
/// of the sum of its keys, and its rolling minute).
#[derive(Debug)]
pub struct GroupEntry {
    pub name: Arc<str>,
    pub limits: Limits,
    pub counters: Arc<KeyCounters>,
}

impl GroupEntry {
    pub fn limits_of(g: &GroupRecord) -> Limits {
        Limits {
            rpm: g.rpm,
            rpd: None,
            budget: g.budget,
            hard_budget: g.budget_mode == crate::keys::BudgetMode::Hard,
            ..Limits::default()
        }
    }
}

/// Every group, by name; immutable, swapped with the key set.
#[derive(Debug, Default)]
pub struct Groups {
    by_name: HashMap<Arc<str>, Arc<GroupEntry>>,
}

impl Groups {
    /// Groups from the store. A group the previous snapshot had keeps its live counters (so
    /// a reload never drops a hold); a new one starts from `restore`.
    pub fn build(
        records: &[GroupRecord],
        previous: Option<&Groups>,
        mut restore: impl FnMut(&GroupRecord) -> KeyCounters,
    ) -> Groups {
        let by_name = records
            .iter()
            .map(|g| {
                let counters = previous
                    .and_then(|p| p.get(&g.name))
                    .map(|old| old.counters.clone())
                    .unwrap_or_else(|| Arc::new(restore(g)));
                let name: Arc<str> = Arc::from(g.name.as_str());
                let entry = GroupEntry {
                    name: name.clone(),
                    limits: GroupEntry::limits_of(g),
                    counters,
                };
                (name, Arc::new(entry))
            })
            .collect();
        Groups { by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<GroupEntry>> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<GroupEntry>> {
        self.by_name.values()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The keys above `key`, nearest first. A parent missing from the snapshot (deleted) ends
/// the walk with 401 `token_revoked`, as does a revoked one; an expired one gives
/// `token_expired`: a key is never usable when a key above it is not.
pub fn ancestors<'a>(
    keys: &'a KeySet,
    key: &'a KeyEntry,
    now: i64,
) -> Result<Vec<&'a Arc<KeyEntry>>, GateError> {
    let mut out = Vec::new();
    let mut next = key.parent.as_deref();
    while let Some(id) = next {
        // A cycle cannot be stored (a parent exists before its child), but a walk that
        // never ends must not be possible either.
        if out.len() > MAX_DEPTH {
            return Err(GateError::TokenRevoked);
        }
        let parent = keys.by_id(id).ok_or(GateError::TokenRevoked)?;
        parent.check_alive(now)?;
        out.push(parent);
        next = parent.parent.as_deref();
    }
    Ok(out)
}

/// Whether a key and every key above it are alive (for the request's authentication).
pub fn check_tree_alive(keys: &KeySet, key: &KeyEntry, now: i64) -> Result<(), GateError> {
    if key.parent.is_none() {
        return Ok(());
    }
    ancestors(keys, key, now).map(drop)
}

/// The levels an admission of `key` counts against besides the key: its ancestors' budgets
/// (nearest first) and its group. Empty for a lone key, without allocating.
pub fn uplines(keys: &KeySet, key: &KeyEntry, now: i64) -> Result<Vec<Upline>, GateError> {
    if key.parent.is_none() && key.group.is_none() {
        return Ok(Vec::new());
    }
    let mut out: Vec<Upline> = ancestors(keys, key, now)?
        .into_iter()
        .map(|p| Upline {
            level: Level::Parent,
            id: p.id.clone(),
            limits: p.limits,
            counters: p.counters.shared(),
        })
        .collect();
    if let Some(g) = key
        .group
        .as_deref()
        .and_then(|name| keys.groups().get(name))
    {
        out.push(Upline {
            level: Level::Group,
            id: g.name.clone(),
            limits: g.limits,
            counters: g.counters.clone(),
        });
    }
    Ok(out)
}

/// [`crate::limits::hard_capped`] of `key` and its levels as the key set has them now. Such a
/// key pauses while spend cannot be recorded (SPEC §2, `ledger_unavailable`). A key whose
/// levels cannot be read is left to admission, which refuses it for that.
pub fn hard_capped(keys: &KeySet, key: &KeyEntry, now: i64) -> bool {
    key.limits.has_hard_budget()
        || uplines(keys, key, now)
            .is_ok_and(|levels| crate::limits::hard_capped(&key.limits, &levels))
}

/// This month's spend of every key below `id`, from the ledger's per-key rows (`parents`:
/// (child, parent) of every minted key).
pub fn tree_total(
    id: &str,
    parents: &[(String, String)],
    spend: &HashMap<String, Vec<ModelTally>>,
) -> Nanos {
    let mut total = Nanos::ZERO;
    let mut frontier = vec![id];
    // Depth is bounded, so this walks at most MAX_DEPTH levels of the list.
    for _ in 0..=MAX_DEPTH {
        let children: Vec<&str> = parents
            .iter()
            .filter(|(_, p)| frontier.contains(&p.as_str()))
            .map(|(c, _)| c.as_str())
            .collect();
        for c in &children {
            total += spend
                .get(*c)
                .map_or(Nanos::ZERO, |t| t.iter().map(|t| t.spent).sum());
        }
        if children.is_empty() {
            break;
        }
        frontier = children;
    }
    total
}

/// A key joined or left group `name`: its spend becomes the sum of its keys' again, from
/// their live counters (holds in flight stay where they were taken).
pub fn reseed_group(keys: &KeySet, name: &str, now: Now) {
    let Some(group) = keys.groups().get(name) else {
        return;
    };
    let mut tallies: Vec<ModelTally> = Vec::new();
    for k in keys.iter().filter(|k| k.group.as_deref() == Some(name)) {
        for t in k.counters.view(now, &k.limits).by_model {
            match tallies.iter_mut().find(|x| x.model == t.model) {
                Some(x) => {
                    x.requests += t.requests;
                    x.prompt_tokens = x.prompt_tokens.saturating_add(t.prompt_tokens);
                    x.completion_tokens = x.completion_tokens.saturating_add(t.completion_tokens);
                    x.spent += t.spent;
                }
                None => tallies.push(t),
            }
        }
    }
    group.counters.reseed(now, tallies);
}
