//! Keys in PostgreSQL: the same operations and semantics as `sqlite::keys`, with patches
//! read and written under a row lock.

use postgres::Row;

use super::{prepared, Postgres};
use crate::keys::token::TokenHash;
use crate::keys::{BudgetMode, KeyRecord, KeyRow};
use crate::limits::Limits;
use crate::money::Nanos;
use crate::store::keys::{join, key_columns, split, KeyFilter, KeyPage, KeyPatch};
use crate::store::{Result, StoreError};

/// Keys read per round trip by `for_each_key_row` (bounds memory at a million keys).
const KEY_PAGE: i64 = 5_000;

/// A limit column (BIGINT) as the `u32` the key carries.
pub(super) fn limit(row: &Row, i: usize) -> Result<Option<u32>> {
    row.try_get::<_, Option<i64>>(i)?
        .map(|n| {
            u32::try_from(n)
                .map_err(|_| StoreError::Other(format!("stored limit {n} is out of range")))
        })
        .transpose()
}

pub(super) fn limit_param(v: Option<u32>) -> Option<i64> {
    v.map(i64::from)
}

/// A 32-byte digest column (`None` for NULL or any other length).
fn hash32(row: &Row, i: usize) -> Result<Option<TokenHash>> {
    Ok(row
        .try_get::<_, Option<&[u8]>>(i)?
        .and_then(|b| b.try_into().ok()))
}

pub(super) fn key_from_row(row: &Row) -> Result<KeyRecord> {
    let mode: &str = row.try_get(8)?;
    Ok(KeyRecord {
        id: row.try_get(0)?,
        token_hash: hash32(row, 1)?.unwrap_or([0; 32]),
        prefix: row.try_get(2)?,
        name: row.try_get(3)?,
        scopes: split(row.try_get(4)?),
        rpm: limit(row, 5)?,
        rpd: limit(row, 6)?,
        budget: row.try_get::<_, Option<i64>>(7)?.map(Nanos::new),
        budget_mode: BudgetMode::parse(mode).unwrap_or(BudgetMode::Soft),
        max_inflight: limit(row, 16)?,
        previous_hash: hash32(row, 17)?,
        previous_valid_until: row.try_get(18)?,
        rotated_at: row.try_get(19)?,
        group: row.try_get(20)?,
        parent_id: row.try_get(21)?,
        max_usd_per_hour: row.try_get::<_, Option<i64>>(22)?.map(Nanos::new),
        loop_limit: limit(row, 23)?,
        allowed_models: split(row.try_get(9)?),
        free_only: row.try_get(10)?,
        client_id: row.try_get(11)?,
        created_at: row.try_get(12)?,
        expires_at: row.try_get(13)?,
        revoked_at: row.try_get(14)?,
        last_used_at: row.try_get(15)?,
    })
}

// Whole `&'static str` queries, since prepared statements are cached by their text.
const GET_KEY: &str = concat!(
    "SELECT ",
    key_columns!(),
    " FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id WHERE k.id = $1"
);
const GET_KEY_FOR_UPDATE: &str = concat!(
    "SELECT ",
    key_columns!(),
    " FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id WHERE k.id = $1 FOR UPDATE OF k"
);
const ALL_KEYS: &str = concat!(
    "SELECT ",
    key_columns!(),
    " FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id ORDER BY k.created_at, k.id"
);

/// The runaway-agent brake columns, written apart from the rest of the row so that keys
/// without brakes are inserted exactly as before.
fn write_brakes(
    tx: &mut postgres::Transaction<'_>,
    cache: &mut std::collections::HashMap<&'static str, postgres::Statement>,
    k: &KeyRecord,
) -> Result<()> {
    let stmt = prepared(
        cache,
        tx,
        "UPDATE keys SET max_usd_per_hour_nanos = $2, loop_limit = $3 WHERE id = $1",
    )?;
    tx.execute(
        &stmt,
        &[
            &k.id,
            &k.max_usd_per_hour.map(Nanos::get),
            &limit_param(k.loop_limit),
        ],
    )?;
    Ok(())
}

/// The filter of a key page ($1 now, $2 status, $3 parent, $4 group, $5 pattern); a macro
/// so the count and the page are whole `&'static str` queries.
macro_rules! key_page_where {
    () => {
        " WHERE ($2::text IS NULL
            OR ($2::text = 'active' AND k.revoked_at IS NULL AND k.expires_at > $1::bigint)
            OR ($2::text = 'expired' AND k.revoked_at IS NULL AND k.expires_at <= $1::bigint)
            OR ($2::text = 'revoked' AND k.revoked_at IS NOT NULL))
          AND ($3::text IS NULL OR k.parent_id = $3::text)
          AND ($4::text IS NULL OR k.group_name = $4::text)
          AND ($5::text IS NULL OR lower(k.id) LIKE $5::text ESCAPE '\\'
            OR lower(k.name) LIKE $5::text ESCAPE '\\' OR lower(k.prefix) LIKE $5::text ESCAPE '\\'
            OR lower(COALESCE(k.group_name, '')) LIKE $5::text ESCAPE '\\')"
    };
}
const KEY_PAGE_COUNT: &str = concat!("SELECT COUNT(*) FROM keys k", key_page_where!());
const KEY_PAGE_ROWS: &str = concat!(
    "SELECT ",
    key_columns!(),
    " FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id",
    key_page_where!(),
    " ORDER BY CASE WHEN k.revoked_at IS NOT NULL THEN 2
                    WHEN k.expires_at <= $1::bigint THEN 1 ELSE 0 END,
               k.created_at DESC, k.id
      LIMIT $6::bigint OFFSET $7::bigint"
);

impl Postgres {
    /// One page of the matching keys and their count (a `NULL` limit is none).
    pub fn key_page(&self, f: &KeyFilter, now: i64) -> Result<KeyPage> {
        let status = f.status.map(|s| s.as_str());
        let pattern = f.pattern();
        let total: i64 = self.scalar(
            KEY_PAGE_COUNT,
            &[&now, &status, &f.parent, &f.group, &pattern],
        )?;
        let limit = f.limit.map(i64::from);
        let offset = i64::from(f.offset);
        let rows = self.query(
            KEY_PAGE_ROWS,
            &[
                &now, &status, &f.parent, &f.group, &pattern, &limit, &offset,
            ],
        )?;
        Ok(KeyPage {
            total: u64::try_from(total).unwrap_or(0),
            keys: rows.iter().map(key_from_row).collect::<Result<_>>()?,
        })
    }

    pub fn insert_keys(&mut self, keys: &[KeyRecord]) -> Result<()> {
        self.write(|tx, cache| {
            let stmt = prepared(
                cache,
                tx,
                "INSERT INTO keys (id, token_hash, prefix, name, scopes, rpm, rpd, budget_nanos,
                    budget_mode, allowed_models, free_only, client_id, created_at, expires_at,
                    revoked_at, max_inflight, group_name, parent_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
            )?;
            for k in keys {
                tx.execute(
                    &stmt,
                    &[
                        &k.id,
                        &&k.token_hash[..],
                        &k.prefix,
                        &k.name,
                        &join(&k.scopes),
                        &limit_param(k.rpm),
                        &limit_param(k.rpd),
                        &k.budget.map(Nanos::get),
                        &k.budget_mode.as_str(),
                        &join(&k.allowed_models),
                        &k.free_only,
                        &k.client_id,
                        &k.created_at,
                        &k.expires_at,
                        &k.revoked_at,
                        &limit_param(k.max_inflight),
                        &k.group,
                        &k.parent_id,
                    ],
                )?;
                if k.max_usd_per_hour.is_some() || k.loop_limit.is_some() {
                    write_brakes(tx, cache, k)?;
                }
            }
            Ok(())
        })
    }

    pub fn key_count(&self) -> Result<usize> {
        let n: i64 = self.scalar("SELECT COUNT(*) FROM keys", &[])?;
        Ok(n as usize)
    }

    /// Pages through the keys by id, so neither the server nor this process holds every key
    /// at once; `f` runs between pages, with the connection free (it may use the store).
    pub fn for_each_key_row(&self, mut f: impl FnMut(&KeyRow<'_>)) -> Result<()> {
        let mut after = String::new();
        loop {
            let rows = self.query(
                "SELECT id, token_hash, name, scopes, allowed_models, rpm, rpd, budget_nanos,
                    budget_mode, max_inflight, free_only, expires_at, revoked_at IS NOT NULL,
                    prev_token_hash, prev_valid_until, group_name, parent_id, max_usd_per_hour_nanos, loop_limit
                 FROM keys WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &KEY_PAGE],
            )?;
            for r in &rows {
                let previous = match (hash32(r, 13)?, r.try_get::<_, Option<i64>>(14)?) {
                    (Some(h), Some(until)) => Some((h, until)),
                    _ => None,
                };
                let mode: &str = r.try_get(8)?;
                f(&KeyRow {
                    id: r.try_get(0)?,
                    token_hash: hash32(r, 1)?.unwrap_or([0; 32]),
                    name: r.try_get(2)?,
                    scopes: r.try_get(3)?,
                    allowed_models: r.try_get(4)?,
                    limits: Limits {
                        rpm: limit(r, 5)?,
                        rpd: limit(r, 6)?,
                        budget: r.try_get::<_, Option<i64>>(7)?.map(Nanos::new),
                        hard_budget: mode == BudgetMode::Hard.as_str(),
                        max_inflight: limit(r, 9)?,
                        max_usd_per_hour: r.try_get::<_, Option<i64>>(17)?.map(Nanos::new),
                        loop_limit: limit(r, 18)?,
                    },
                    free_only: r.try_get(10)?,
                    expires_at: r.try_get(11)?,
                    revoked: r.try_get(12)?,
                    previous,
                    group: r.try_get(15)?,
                    parent: r.try_get(16)?,
                });
            }
            match rows.last() {
                Some(last) if rows.len() as i64 == KEY_PAGE => after = last.try_get(0)?,
                _ => return Ok(()),
            }
        }
    }

    pub fn all_keys(&self) -> Result<Vec<KeyRecord>> {
        self.query(ALL_KEYS, &[])?
            .iter()
            .map(key_from_row)
            .collect()
    }

    pub fn get_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        self.query(GET_KEY, &[&id])?
            .first()
            .map(key_from_row)
            .transpose()
    }

    /// The read locks the key's row until the write commits (SQLite's `BEGIN IMMEDIATE`).
    pub fn update_key(&mut self, id: &str, p: &KeyPatch) -> Result<Option<KeyRecord>> {
        self.write(|tx, cache| {
            let read = prepared(cache, tx, GET_KEY_FOR_UPDATE)?;
            let Some(mut k) = tx
                .query(&read, &[&id])?
                .first()
                .map(key_from_row)
                .transpose()?
            else {
                return Ok(None);
            };
            p.apply(&mut k);
            let write = prepared(
                cache,
                tx,
                "UPDATE keys SET name = $2, scopes = $3, rpm = $4, rpd = $5, budget_nanos = $6,
                    budget_mode = $7, allowed_models = $8, free_only = $9, client_id = $10,
                    expires_at = $11, max_inflight = $12, group_name = $13
                 WHERE id = $1",
            )?;
            tx.execute(
                &write,
                &[
                    &id,
                    &k.name,
                    &join(&k.scopes),
                    &limit_param(k.rpm),
                    &limit_param(k.rpd),
                    &k.budget.map(Nanos::get),
                    &k.budget_mode.as_str(),
                    &join(&k.allowed_models),
                    &k.free_only,
                    &k.client_id,
                    &k.expires_at,
                    &limit_param(k.max_inflight),
                    &k.group,
                ],
            )?;
            write_brakes(tx, cache, &k)?;
            Ok(Some(k))
        })
    }

    pub fn rotate_key(
        &mut self,
        id: &str,
        new_hash: &TokenHash,
        new_prefix: &str,
        previous_valid_until: i64,
        now: i64,
    ) -> Result<Option<KeyRecord>> {
        let changed = self.execute(
            "UPDATE keys SET prev_token_hash = token_hash, prev_valid_until = $4,
                token_hash = $2, prefix = $3, rotated_at = $5
             WHERE id = $1",
            &[
                &id,
                &&new_hash[..],
                &new_prefix,
                &previous_valid_until,
                &now,
            ],
        )?;
        if changed == 0 {
            return Ok(None);
        }
        self.get_key(id)
    }

    pub fn revoke_key(&mut self, id: &str, now: i64) -> Result<Option<KeyRecord>> {
        // The key and every key it minted, down the tree (SPEC §7).
        let changed = self.execute(
            "WITH RECURSIVE tree(id) AS (
                 SELECT $1::TEXT UNION SELECT k.id FROM keys k JOIN tree ON k.parent_id = tree.id)
             UPDATE keys SET revoked_at = COALESCE(revoked_at, $2)
             WHERE id IN (SELECT id FROM tree)",
            &[&id, &now],
        )?;
        if changed == 0 {
            return Ok(None);
        }
        self.get_key(id)
    }
}
