//! [`KeySet`]: the immutable snapshot of every key the request path reads, as a large base
//! map plus a small overlay of recent changes. A change to N keys copies the overlay and
//! applies N entries (O(N + overlay)), never the whole set; once the overlay grows past a
//! fraction of the base, the two are merged (amortised, off the request path).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use super::token::TokenHash;
use super::{parse_list, AllowBits, CounterSlot, KeyEntry, KeyRecord, KeyRow, ScopeSet};
use crate::catalog::Catalog;
use crate::fleet::Groups;
use crate::limits::KeyCounters;

/// The token hash is already a uniform SHA-256: its first 8 bytes are a perfect hash.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 |= (*b as u64) << (i * 8);
        }
    }
}

type DigestMap<V> = HashMap<TokenHash, V, BuildHasherDefault<DigestHasher>>;

/// A secret's key and the time the secret stops working (`i64::MAX` for the current one;
/// the end of the grace period for the secret a rotation replaced).
type HashEntry = (Arc<KeyEntry>, i64);

#[derive(Clone)]
struct Maps<T: Clone> {
    by_hash: DigestMap<T>,
    by_id: HashMap<Arc<str>, Option<Arc<KeyEntry>>>,
}

impl<T: Clone> Default for Maps<T> {
    fn default() -> Self {
        Maps {
            by_hash: DigestMap::default(),
            by_id: HashMap::new(),
        }
    }
}

/// Immutable snapshot of every key, swapped whole on reload. The request path does one
/// `ArcSwap::load` and a hash lookup (two when the overlay is not empty); no lock, no
/// syscall.
#[derive(Default)]
pub struct KeySet {
    base: Arc<Maps<HashEntry>>,
    /// Changes since the base was built: `None` is a removal.
    overlay: Maps<Option<HashEntry>>,
    len: usize,
    /// The groups keys belong to (SPEC §7), swapped with the keys.
    groups: Arc<Groups>,
}

/// The overlay is merged into the base once it holds more entries than this, or than a
/// sixteenth of the base.
const MERGE_AT: usize = 4_096;

impl KeySet {
    /// Builds a snapshot, carrying over the live counters of keys the previous one had, so a
    /// reload never resets a key's windows or in-flight reservations.
    pub fn build(
        records: Vec<KeyRecord>,
        catalog: &Catalog,
        previous: Option<&KeySet>,
        mut restore: impl FnMut(&KeyRecord) -> KeyCounters,
    ) -> KeySet {
        let mut builder = KeySetBuilder::new(records.len(), catalog, previous);
        for record in &records {
            record.with_row(|row| builder.add(row, |_| Some(restore(record))));
        }
        builder.finish()
    }

    /// A builder that takes stored rows one at a time (see [`KeySetBuilder`]).
    pub fn builder<'a>(
        capacity: usize,
        catalog: &'a Catalog,
        previous: Option<&'a KeySet>,
    ) -> KeySetBuilder<'a> {
        KeySetBuilder::new(capacity, catalog, previous)
    }

    /// A new snapshot with `changed` keys replaced (or added) and `removed` ids gone; every
    /// other key is shared with this one. Counters carry over for keys this one has.
    pub fn apply(
        &self,
        changed: Vec<KeyRecord>,
        removed: &[String],
        catalog: &Catalog,
        mut restore: impl FnMut(&KeyRecord) -> KeyCounters,
    ) -> KeySet {
        let mut overlay = self.overlay.clone();
        let mut len = self.len;
        let drop_old = |overlay: &mut Maps<Option<HashEntry>>, id: &str| {
            if let Some(old) = self.by_id(id) {
                for (hash, _) in old.secrets() {
                    overlay.by_hash.insert(hash, None);
                }
                true
            } else {
                false
            }
        };
        for id in removed {
            if drop_old(&mut overlay, id) {
                len -= 1;
            }
            overlay.by_id.insert(Arc::from(id.as_str()), None);
        }
        for record in changed {
            if !drop_old(&mut overlay, &record.id) {
                len += 1;
            }
            let counters = match self.by_id(&record.id) {
                Some(old) => old.counters.shared(),
                None => Arc::new(restore(&record)),
            };
            let entry = Arc::new(KeyEntry::new(record, catalog, counters));
            for (hash, until) in entry.secrets() {
                overlay.by_hash.insert(hash, Some((entry.clone(), until)));
            }
            overlay.by_id.insert(entry.id.clone(), Some(entry));
        }
        let set = KeySet {
            base: self.base.clone(),
            overlay,
            len,
            groups: self.groups.clone(),
        };
        if set.overlay.by_id.len() > MERGE_AT.max(set.base.by_id.len() / 16) {
            set.merged()
        } else {
            set
        }
    }

    /// Base and overlay as one base (O(all keys); rare, see [`MERGE_AT`]).
    fn merged(&self) -> KeySet {
        let mut base = (*self.base).clone();
        for (hash, v) in &self.overlay.by_hash {
            match v {
                Some(e) => base.by_hash.insert(*hash, e.clone()),
                None => base.by_hash.remove(hash),
            };
        }
        for (id, v) in &self.overlay.by_id {
            match v {
                Some(e) => base.by_id.insert(id.clone(), Some(e.clone())),
                None => base.by_id.remove(id),
            };
        }
        KeySet {
            len: base.by_id.len(),
            base: Arc::new(base),
            overlay: Maps::default(),
            groups: self.groups.clone(),
        }
    }

    /// The key a secret belongs to, and when that secret stops working.
    pub fn by_hash(&self, hash: &TokenHash) -> Option<(&Arc<KeyEntry>, i64)> {
        let found = match self.overlay.by_hash.get(hash) {
            Some(v) => v.as_ref(),
            None => self.base.by_hash.get(hash),
        };
        found.map(|(k, until)| (k, *until))
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<KeyEntry>> {
        match self.overlay.by_id.get(id) {
            Some(v) => v.as_ref(),
            None => self.base.by_id.get(id).and_then(Option::as_ref),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn groups(&self) -> &Arc<Groups> {
        &self.groups
    }

    /// This set with `groups` as its groups.
    pub fn with_groups(mut self, groups: Arc<Groups>) -> KeySet {
        self.groups = groups;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every key (order unspecified).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<KeyEntry>> {
        let base = self
            .base
            .by_id
            .iter()
            .filter(|(id, _)| !self.overlay.by_id.contains_key(*id))
            .filter_map(|(_, e)| e.as_ref());
        base.chain(self.overlay.by_id.values().filter_map(Option::as_ref))
    }
}

/// Builds a [`KeySet`] from stored rows in one pass, without a record per key: each row's
/// lists are decoded once per distinct stored text (keys share a few scope and allow-list
/// sets), the maps are sized up front, and a key's counters are made only if the ledger has
/// something for it (or on first use).
pub struct KeySetBuilder<'a> {
    catalog: &'a Catalog,
    previous: Option<&'a KeySet>,
    base: Maps<HashEntry>,
    scopes: HashMap<Box<str>, ScopeSet>,
    allowed: HashMap<Box<str>, AllowBits>,
}

impl<'a> KeySetBuilder<'a> {
    /// `capacity`: the number of keys expected (the maps are sized for it).
    pub fn new(capacity: usize, catalog: &'a Catalog, previous: Option<&'a KeySet>) -> Self {
        KeySetBuilder {
            catalog,
            previous,
            base: Maps {
                by_hash: DigestMap::with_capacity_and_hasher(capacity, Default::default()),
                by_id: HashMap::with_capacity(capacity),
            },
            scopes: HashMap::new(),
            allowed: HashMap::new(),
        }
    }

    /// Adds one key. Counters: the previous snapshot's for a key it has (the same ones, so
    /// requests still running on it count there too); else `restore(id)`, where `None`
    /// means "nothing in the ledger", and the counters are made on first use.
    pub fn add(&mut self, row: &KeyRow<'_>, restore: impl FnOnce(&str) -> Option<KeyCounters>) {
        let counters = match self.previous.and_then(|p| p.by_id(row.id)) {
            Some(old) => CounterSlot::new(old.counters.shared()),
            None => {
                restore(row.id).map_or_else(CounterSlot::default, |c| CounterSlot::new(Arc::new(c)))
            }
        };
        let scopes = match self.scopes.get(row.scopes) {
            Some(s) => *s,
            None => {
                let s = ScopeSet::from_names(&parse_list(row.scopes));
                self.scopes.insert(row.scopes.into(), s);
                s
            }
        };
        let allow = match self.allowed.get(row.allowed_models) {
            Some(a) => a.clone(),
            None => {
                let a = AllowBits::new(&parse_list(row.allowed_models), self.catalog);
                self.allowed.insert(row.allowed_models.into(), a.clone());
                a
            }
        };
        let entry = Arc::new(KeyEntry::from_row(row, scopes, allow, counters));
        for (hash, until) in entry.secrets() {
            self.base.by_hash.insert(hash, (entry.clone(), until));
        }
        self.base.by_id.insert(entry.id.clone(), Some(entry));
    }

    pub fn finish(self) -> KeySet {
        KeySet {
            len: self.base.by_id.len(),
            base: Arc::new(self.base),
            overlay: Maps::default(),
            groups: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::keys::BudgetMode;
    use std::path::Path;

    pub fn catalog() -> Catalog {
        let yaml = r#"
listen: "127.0.0.1:8080"
database: "x.db"
providers: [{name: p, kind: openai, base_url: "http://127.0.0.1:1/v1"}]
models: [{id: m, provider: p, input_usd_per_mtok: 1, output_usd_per_mtok: 1}]
"#;
        Catalog::new(&crate::config::Config::parse(yaml, Path::new("t.yaml")).unwrap())
    }

    pub fn record_n(i: u32) -> KeyRecord {
        let mut r = record(i, 0);
        let digest = crate::keys::token::hash_token(&format!("secret-{i}"));
        r.token_hash = digest;
        r
    }

    pub fn record(i: u32, secret: u8) -> KeyRecord {
        KeyRecord {
            token_hash: [secret; 32],
            rpm: Some(i + 1),
            budget_mode: BudgetMode::Hard,
            ..KeyRecord::for_test(&format!("key_{i}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    #[test]
    fn changes_apply_on_top_and_counters_carry_over() {
        let c = catalog();
        let set = KeySet::build(vec![record(1, 1), record(2, 2)], &c, None, |_| {
            KeyCounters::default()
        });
        let counters = set.by_id("key_1").unwrap().counters.shared();
        // key_1 rotated (new secret, old one in grace), key_2 removed, key_3 added.
        let mut rotated = record(1, 11);
        rotated.previous_hash = Some([1; 32]);
        rotated.previous_valid_until = Some(500);
        let next = set.apply(
            vec![rotated, record(3, 3)],
            &["key_2".to_string()],
            &c,
            |_| KeyCounters::default(),
        );
        assert_eq!(next.len(), 2);
        assert!(next.by_id("key_2").is_none() && next.by_hash(&[2; 32]).is_none());
        assert_eq!(next.by_hash(&[1; 32]).map(|(_, until)| until), Some(500));
        assert_eq!(
            next.by_hash(&[11; 32]).map(|(_, until)| until),
            Some(i64::MAX)
        );
        assert!(Arc::ptr_eq(
            &next.by_id("key_1").unwrap().counters.shared(),
            &counters
        ));
        assert_eq!(next.iter().count(), 2);
        // The old snapshot is untouched.
        assert_eq!(set.len(), 2);
        assert!(set.by_id("key_2").is_some());
        // Merging keeps the same view.
        let merged = next.merged();
        assert_eq!(merged.len(), 2);
        assert!(merged.by_hash(&[11; 32]).is_some() && merged.by_hash(&[2; 32]).is_none());
        assert_eq!(merged.iter().count(), 2);
    }
}

#[cfg(test)]
mod bulk_tests {
    use super::tests_support::*;
    use super::*;

    #[test]
    fn many_new_keys_applied_at_once_are_all_found_after_the_merge() {
        let c = catalog();
        let empty = KeySet::default();
        let records: Vec<KeyRecord> = (0..10_000u32).map(record_n).collect();
        let hashes: Vec<TokenHash> = records.iter().map(|r| r.token_hash).collect();
        let set = empty.apply(records, &[], &c, |_| KeyCounters::default());
        assert_eq!(set.len(), 10_000);
        for h in &hashes {
            assert!(set.by_hash(h).is_some());
        }
    }
}
