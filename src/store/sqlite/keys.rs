//! Keys in SQLite: insert, read, patch (read and written in one transaction), rotate,
//! revoke. Lists are stored as JSON.

use rusqlite::{params, OptionalExtension, Row};

use super::Sqlite;
use crate::keys::token::TokenHash;
use crate::keys::{BudgetMode, KeyRecord, KeyRow};
use crate::limits::Limits;
use crate::money::Nanos;
use crate::store::keys::{join, split, KeyFilter, KeyPage, KeyPatch, KEY_COLUMNS};
use crate::store::Result;

/// A text column, borrowed from the row.
fn text<'r>(row: &'r Row<'_>, i: usize) -> rusqlite::Result<&'r str> {
    let v = row.get_ref(i)?;
    v.as_str()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, v.data_type(), Box::new(e)))
}

/// A nullable text column, borrowed from the row.
fn opt_text<'r>(row: &'r Row<'_>, i: usize) -> rusqlite::Result<Option<&'r str>> {
    let v = row.get_ref(i)?;
    v.as_str_or_null()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, v.data_type(), Box::new(e)))
}

/// A 32-byte digest column (`None` for NULL or any other length).
fn blob32(row: &Row<'_>, i: usize) -> rusqlite::Result<Option<TokenHash>> {
    Ok(match row.get_ref(i)? {
        rusqlite::types::ValueRef::Blob(b) => b.try_into().ok(),
        _ => None,
    })
}

pub(super) fn key_from_row(row: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    let hash: Vec<u8> = row.get(1)?;
    let mut token_hash = [0u8; 32];
    if hash.len() == 32 {
        token_hash.copy_from_slice(&hash);
    }
    let mode: String = row.get(8)?;
    Ok(KeyRecord {
        id: row.get(0)?,
        token_hash,
        prefix: row.get(2)?,
        name: row.get(3)?,
        scopes: split(&row.get::<_, String>(4)?),
        rpm: row.get(5)?,
        rpd: row.get(6)?,
        budget: row.get::<_, Option<i64>>(7)?.map(Nanos::new),
        budget_mode: BudgetMode::parse(&mode).unwrap_or(BudgetMode::Soft),
        max_inflight: row.get(16)?,
        previous_hash: row
            .get::<_, Option<Vec<u8>>>(17)?
            .and_then(|h| h.try_into().ok()),
        previous_valid_until: row.get(18)?,
        rotated_at: row.get(19)?,
        group: row.get(20)?,
        parent_id: row.get(21)?,
        max_usd_per_hour: row.get::<_, Option<i64>>(22)?.map(Nanos::new),
        loop_limit: row.get(23)?,
        allowed_models: split(&row.get::<_, String>(9)?),
        free_only: row.get(10)?,
        client_id: row.get(11)?,
        created_at: row.get(12)?,
        expires_at: row.get(13)?,
        revoked_at: row.get(14)?,
        last_used_at: row.get(15)?,
    })
}

/// The runaway-agent brake columns, written apart from the rest of the row so that keys
/// without brakes are inserted exactly as before.
fn write_brakes(tx: &rusqlite::Transaction<'_>, k: &KeyRecord) -> Result<()> {
    tx.prepare_cached(
        "UPDATE keys SET max_usd_per_hour_nanos = ?2, loop_limit = ?3 WHERE id = ?1",
    )?
    .execute(params![
        k.id,
        k.max_usd_per_hour.map(Nanos::get),
        k.loop_limit
    ])?;
    Ok(())
}

impl Sqlite {
    /// Inserts many keys in one transaction (bulk provisioning, benchmarks).
    pub fn insert_keys(&mut self, keys: &[KeyRecord]) -> Result<()> {
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO keys (id, token_hash, prefix, name, scopes, rpm, rpd, budget_nanos,
                    budget_mode, allowed_models, free_only, client_id, created_at, expires_at,
                    revoked_at, max_inflight, group_name, parent_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
            )?;
            for k in keys {
                stmt.execute(params![
                    k.id,
                    &k.token_hash[..],
                    k.prefix,
                    k.name,
                    join(&k.scopes),
                    k.rpm,
                    k.rpd,
                    k.budget.map(Nanos::get),
                    k.budget_mode.as_str(),
                    join(&k.allowed_models),
                    k.free_only,
                    k.client_id,
                    k.created_at,
                    k.expires_at,
                    k.revoked_at,
                    k.max_inflight,
                    k.group,
                    k.parent_id,
                ])?;
                if k.max_usd_per_hour.is_some() || k.loop_limit.is_some() {
                    write_brakes(tx, k)?;
                }
            }
            Ok(())
        })
    }

    /// How many keys the store holds.
    pub fn key_count(&self) -> Result<usize> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM keys", [], |r| r.get(0))?;
        Ok(n as usize)
    }

    /// Calls `f` with every key as a borrowed row, in storage order: one scan of `keys`, no
    /// sort, no join and no allocation per key (start-up and full reloads of the snapshot).
    pub fn for_each_key_row(&self, mut f: impl FnMut(&KeyRow<'_>)) -> Result<()> {
        let mut stmt = self.conn.prepare(
            "SELECT id, token_hash, name, scopes, allowed_models, rpm, rpd, budget_nanos,
                budget_mode, max_inflight, free_only, expires_at, revoked_at, prev_token_hash,
                prev_valid_until, group_name, parent_id, max_usd_per_hour_nanos, loop_limit
             FROM keys",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let previous = match (blob32(r, 13)?, r.get::<_, Option<i64>>(14)?) {
                (Some(h), Some(until)) => Some((h, until)),
                _ => None,
            };
            f(&KeyRow {
                id: text(r, 0)?,
                token_hash: blob32(r, 1)?.unwrap_or([0; 32]),
                name: text(r, 2)?,
                scopes: text(r, 3)?,
                allowed_models: text(r, 4)?,
                limits: Limits {
                    rpm: r.get(5)?,
                    rpd: r.get(6)?,
                    budget: r.get::<_, Option<i64>>(7)?.map(Nanos::new),
                    hard_budget: text(r, 8)? == BudgetMode::Hard.as_str(),
                    max_inflight: r.get(9)?,
                    max_usd_per_hour: r.get::<_, Option<i64>>(17)?.map(Nanos::new),
                    loop_limit: r.get(18)?,
                },
                free_only: r.get(10)?,
                expires_at: r.get(11)?,
                revoked: r.get_ref(12)? != rusqlite::types::ValueRef::Null,
                previous,
                group: opt_text(r, 15)?,
                parent: opt_text(r, 16)?,
            });
        }
        Ok(())
    }

    pub fn all_keys(&self) -> Result<Vec<KeyRecord>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id
             ORDER BY k.created_at, k.id"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([], key_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One page of the matching keys and their count: two statements over the same
    /// parameters (?1 now, ?2 status, ?3 parent, ?4 group, ?5 pattern).
    pub fn key_page(&self, f: &KeyFilter, now: i64) -> Result<KeyPage> {
        const WHERE: &str = "WHERE (?2 IS NULL
                OR (?2 = 'active' AND k.revoked_at IS NULL AND k.expires_at > ?1)
                OR (?2 = 'expired' AND k.revoked_at IS NULL AND k.expires_at <= ?1)
                OR (?2 = 'revoked' AND k.revoked_at IS NOT NULL))
            AND (?3 IS NULL OR k.parent_id = ?3)
            AND (?4 IS NULL OR k.group_name = ?4)
            AND (?5 IS NULL OR lower(k.id) LIKE ?5 ESCAPE '\\' OR lower(k.name) LIKE ?5 ESCAPE '\\'
                OR lower(k.prefix) LIKE ?5 ESCAPE '\\'
                OR lower(COALESCE(k.group_name, '')) LIKE ?5 ESCAPE '\\')";
        let status = f.status.map(|s| s.as_str());
        let pattern = f.pattern();
        let total: i64 = self.conn.query_row(
            &format!("SELECT COUNT(*) FROM keys k {WHERE}"),
            params![now, status, f.parent, f.group, pattern],
            |r| r.get(0),
        )?;
        // SQLite reads a negative LIMIT as none.
        let limit = f.limit.map_or(-1, i64::from);
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id
             {WHERE}
             ORDER BY CASE WHEN k.revoked_at IS NOT NULL THEN 2
                           WHEN k.expires_at <= ?1 THEN 1 ELSE 0 END,
                      k.created_at DESC, k.id
             LIMIT ?6 OFFSET ?7"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(
            params![now, status, f.parent, f.group, pattern, limit, f.offset],
            key_from_row,
        )?;
        Ok(KeyPage {
            total: total as u64,
            keys: rows.collect::<rusqlite::Result<_>>()?,
        })
    }

    pub fn get_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id
             WHERE k.id = ?1"
        );
        Ok(self.conn.query_row(&sql, [id], key_from_row).optional()?)
    }

    /// Applies a patch; returns the updated key, or `None` if no such key. The read and the
    /// write share one `BEGIN IMMEDIATE` transaction, so concurrent patches of different
    /// fields (CLI and admin API at once) never overwrite each other.
    pub fn update_key(&mut self, id: &str, p: &KeyPatch) -> Result<Option<KeyRecord>> {
        self.write(|tx| {
            let sql = format!(
                "SELECT {KEY_COLUMNS} FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id
                 WHERE k.id = ?1"
            );
            let Some(mut k) = tx.query_row(&sql, [id], key_from_row).optional()? else {
                return Ok(None);
            };
            p.apply(&mut k);
            tx.execute(
                "UPDATE keys SET name = ?2, scopes = ?3, rpm = ?4, rpd = ?5, budget_nanos = ?6,
                    budget_mode = ?7, allowed_models = ?8, free_only = ?9, client_id = ?10,
                    expires_at = ?11, max_inflight = ?12, group_name = ?13
                 WHERE id = ?1",
                params![
                    id,
                    k.name,
                    join(&k.scopes),
                    k.rpm,
                    k.rpd,
                    k.budget.map(Nanos::get),
                    k.budget_mode.as_str(),
                    join(&k.allowed_models),
                    k.free_only,
                    k.client_id,
                    k.expires_at,
                    k.max_inflight,
                    k.group,
                ],
            )?;
            write_brakes(tx, &k)?;
            Ok(Some(k))
        })
    }

    /// Gives a key a new secret (its hash and display prefix); the previous secret keeps
    /// working until `previous_valid_until`. Returns the updated key, or `None` if no such
    /// key. A revoked key cannot be rotated back to life (`Ok(None)` is not returned for it;
    /// the caller checks the status first).
    pub fn rotate_key(
        &mut self,
        id: &str,
        new_hash: &TokenHash,
        new_prefix: &str,
        previous_valid_until: i64,
        now: i64,
    ) -> Result<Option<KeyRecord>> {
        let changed = self.write(|tx| {
            Ok(tx.execute(
                "UPDATE keys SET prev_token_hash = token_hash, prev_valid_until = ?4,
                    token_hash = ?2, prefix = ?3, rotated_at = ?5
                 WHERE id = ?1",
                params![id, &new_hash[..], new_prefix, previous_valid_until, now],
            )?)
        })?;
        if changed == 0 {
            return Ok(None);
        }
        self.get_key(id)
    }

    /// Revokes a key (idempotent: the first revocation time is kept).
    pub fn revoke_key(&mut self, id: &str, now: i64) -> Result<Option<KeyRecord>> {
        let changed = self.write(|tx| {
            // The key and every key it minted, down the tree (SPEC §7).
            Ok(tx.execute(
                "WITH RECURSIVE tree(id) AS (
                     SELECT ?1 UNION SELECT k.id FROM keys k JOIN tree ON k.parent_id = tree.id)
                 UPDATE keys SET revoked_at = COALESCE(revoked_at, ?2)
                 WHERE id IN (SELECT id FROM tree)",
                params![id, now],
            )?)
        })?;
        if changed == 0 {
            return Ok(None);
        }
        self.get_key(id)
    }
}
