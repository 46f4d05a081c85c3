//! Groups in PostgreSQL, and the fleet queries over keys (members, descendants, their spend).

use postgres::Row;

use super::keys::{key_from_row, limit, limit_param};
use super::{prepared, Postgres};
use crate::keys::{BudgetMode, KeyRecord};
use crate::money::Nanos;
use crate::store::groups::{descendants_cte, GroupPatch, GroupRecord};
use crate::store::keys::key_columns;
use crate::store::{ModelSpend, Result};

fn group_from_row(r: &Row) -> Result<GroupRecord> {
    let mode: &str = r.try_get(2)?;
    Ok(GroupRecord {
        name: r.try_get(0)?,
        budget: r.try_get::<_, Option<i64>>(1)?.map(Nanos::new),
        budget_mode: BudgetMode::parse(mode).unwrap_or(BudgetMode::Hard),
        rpm: limit(r, 3)?,
        created_at: r.try_get(4)?,
    })
}

impl Postgres {
    /// Inserts a group; `false` if one of that name exists.
    pub fn insert_group(&mut self, g: &GroupRecord) -> Result<bool> {
        Ok(self.execute(
            "INSERT INTO groups (name, budget_nanos, budget_mode, rpm, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
            &[
                &g.name,
                &g.budget.map(Nanos::get),
                &g.budget_mode.as_str(),
                &limit_param(g.rpm),
                &g.created_at,
            ],
        )? == 1)
    }

    pub fn get_group(&self, name: &str) -> Result<Option<GroupRecord>> {
        self.query(
            "SELECT name, budget_nanos, budget_mode, rpm, created_at FROM groups WHERE name = $1",
            &[&name],
        )?
        .first()
        .map(group_from_row)
        .transpose()
    }

    pub fn all_groups(&self) -> Result<Vec<GroupRecord>> {
        self.query(
            "SELECT name, budget_nanos, budget_mode, rpm, created_at FROM groups ORDER BY name",
            &[],
        )?
        .iter()
        .map(group_from_row)
        .collect()
    }

    /// Read (locking the row) and write in one transaction, like a key patch.
    pub fn update_group(&mut self, name: &str, p: &GroupPatch) -> Result<Option<GroupRecord>> {
        self.write(|tx, cache| {
            let read = prepared(
                cache,
                tx,
                "SELECT name, budget_nanos, budget_mode, rpm, created_at FROM groups
                 WHERE name = $1 FOR UPDATE",
            )?;
            let Some(mut g) = tx
                .query(&read, &[&name])?
                .first()
                .map(group_from_row)
                .transpose()?
            else {
                return Ok(None);
            };
            p.apply(&mut g);
            let write = prepared(
                cache,
                tx,
                "UPDATE groups SET budget_nanos = $2, budget_mode = $3, rpm = $4 WHERE name = $1",
            )?;
            tx.execute(
                &write,
                &[
                    &name,
                    &g.budget.map(Nanos::get),
                    &g.budget_mode.as_str(),
                    &limit_param(g.rpm),
                ],
            )?;
            Ok(Some(g))
        })
    }

    /// Deletes a group; its keys leave it (in the same transaction). `false` if none.
    pub fn delete_group(&mut self, name: &str) -> Result<bool> {
        self.write(|tx, cache| {
            let detach = prepared(
                cache,
                tx,
                "UPDATE keys SET group_name = NULL WHERE group_name = $1",
            )?;
            tx.execute(&detach, &[&name])?;
            let delete = prepared(cache, tx, "DELETE FROM groups WHERE name = $1")?;
            Ok(tx.execute(&delete, &[&name])? == 1)
        })
    }

    pub fn group_members(&self, name: &str) -> Result<Vec<String>> {
        self.query(
            "SELECT id FROM keys WHERE group_name = $1 ORDER BY created_at, id",
            &[&name],
        )?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
    }

    /// A group's spend in `month` per model: the sum of its keys' rows.
    pub fn group_spend(&self, name: &str, month: &str) -> Result<Vec<ModelSpend>> {
        self.query(
            "SELECT s.model, SUM(s.requests)::BIGINT, SUM(s.prompt_tokens)::BIGINT,
                SUM(s.completion_tokens)::BIGINT, SUM(s.cost_nanos)::BIGINT
             FROM spend s JOIN keys k ON k.id = s.key_id
             WHERE k.group_name = $1 AND s.month = $2 GROUP BY s.model ORDER BY s.model",
            &[&name, &month],
        )?
        .iter()
        .map(super::ledger::model_spend_from_row)
        .collect()
    }

    /// Spend in `month` of every key below `id` (not its own).
    pub fn tree_spend(&self, id: &str, month: &str) -> Result<Nanos> {
        let n: i64 = self.scalar(
            concat!(
                descendants_cte!("$1"),
                "SELECT COALESCE(SUM(cost_nanos), 0)::BIGINT FROM spend
                 WHERE month = $2 AND key_id IN (SELECT id FROM tree)"
            ),
            &[&id, &month],
        )?;
        Ok(Nanos::new(n))
    }

    /// Every key below `id`, oldest first.
    pub fn descendants(&self, id: &str) -> Result<Vec<KeyRecord>> {
        self.query(
            concat!(
                descendants_cte!("$1"),
                "SELECT ",
                key_columns!(),
                " FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id
                 WHERE k.id IN (SELECT id FROM tree) ORDER BY k.created_at, k.id"
            ),
            &[&id],
        )?
        .iter()
        .map(key_from_row)
        .collect()
    }

    /// (child, parent) for every minted key.
    pub fn key_parents(&self) -> Result<Vec<(String, String)>> {
        self.query(
            "SELECT id, parent_id FROM keys WHERE parent_id IS NOT NULL",
            &[],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
    }
}
