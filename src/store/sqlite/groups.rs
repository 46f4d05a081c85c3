//! Groups in SQLite, and the fleet queries over keys (members, descendants, their spend).

use rusqlite::{params, OptionalExtension, Row};

use super::Sqlite;
use crate::keys::{BudgetMode, KeyRecord};
use crate::money::Nanos;
use crate::store::groups::{descendants_cte, GroupPatch, GroupRecord};
use crate::store::keys::KEY_COLUMNS;
use crate::store::{ModelSpend, Result};

fn group_from_row(r: &Row<'_>) -> rusqlite::Result<GroupRecord> {
    let mode: String = r.get(2)?;
    Ok(GroupRecord {
        name: r.get(0)?,
        budget: r.get::<_, Option<i64>>(1)?.map(Nanos::new),
        budget_mode: BudgetMode::parse(&mode).unwrap_or(BudgetMode::Hard),
        rpm: r.get(3)?,
        created_at: r.get(4)?,
    })
}

const GROUP_COLUMNS: &str = "name, budget_nanos, budget_mode, rpm, created_at";

impl Sqlite {
    /// Inserts a group; `false` if one of that name exists.
    pub fn insert_group(&mut self, g: &GroupRecord) -> Result<bool> {
        self.write(|tx| {
            Ok(tx.execute(
                "INSERT OR IGNORE INTO groups (name, budget_nanos, budget_mode, rpm, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    g.name,
                    g.budget.map(Nanos::get),
                    g.budget_mode.as_str(),
                    g.rpm,
                    g.created_at
                ],
            )? == 1)
        })
    }

    pub fn get_group(&self, name: &str) -> Result<Option<GroupRecord>> {
        let sql = format!("SELECT {GROUP_COLUMNS} FROM groups WHERE name = ?1");
        Ok(self
            .conn
            .query_row(&sql, [name], group_from_row)
            .optional()?)
    }

    pub fn all_groups(&self) -> Result<Vec<GroupRecord>> {
        let sql = format!("SELECT {GROUP_COLUMNS} FROM groups ORDER BY name");
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([], group_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Read and write in one transaction, like a key patch.
    pub fn update_group(&mut self, name: &str, p: &GroupPatch) -> Result<Option<GroupRecord>> {
        self.write(|tx| {
            let sql = format!("SELECT {GROUP_COLUMNS} FROM groups WHERE name = ?1");
            let Some(mut g) = tx.query_row(&sql, [name], group_from_row).optional()? else {
                return Ok(None);
            };
            p.apply(&mut g);
            tx.execute(
                "UPDATE groups SET budget_nanos = ?2, budget_mode = ?3, rpm = ?4 WHERE name = ?1",
                params![
                    name,
                    g.budget.map(Nanos::get),
                    g.budget_mode.as_str(),
                    g.rpm
                ],
            )?;
            Ok(Some(g))
        })
    }

    /// Deletes a group; its keys leave it (in the same transaction). `false` if none.
    pub fn delete_group(&mut self, name: &str) -> Result<bool> {
        self.write(|tx| {
            tx.execute(
                "UPDATE keys SET group_name = NULL WHERE group_name = ?1",
                [name],
            )?;
            Ok(tx.execute("DELETE FROM groups WHERE name = ?1", [name])? == 1)
        })
    }

    pub fn group_members(&self, name: &str) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM keys WHERE group_name = ?1 ORDER BY created_at, id")?;
        let rows = stmt.query_map([name], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A group's spend in `month` per model: the sum of its keys' rows.
    pub fn group_spend(&self, name: &str, month: &str) -> Result<Vec<ModelSpend>> {
        let mut stmt = self.conn.prepare(
            "SELECT s.model, SUM(s.requests), SUM(s.prompt_tokens), SUM(s.completion_tokens),
                SUM(s.cost_nanos)
             FROM spend s JOIN keys k ON k.id = s.key_id
             WHERE k.group_name = ?1 AND s.month = ?2 GROUP BY s.model ORDER BY s.model",
        )?;
        let rows = stmt.query_map(params![name, month], super::ledger::model_spend_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Spend in `month` of every key below `id` (not its own).
    pub fn tree_spend(&self, id: &str, month: &str) -> Result<Nanos> {
        let sql = concat!(
            descendants_cte!("?1"),
            "SELECT COALESCE(SUM(cost_nanos), 0) FROM spend
             WHERE month = ?2 AND key_id IN (SELECT id FROM tree)"
        );
        let n: i64 = self.conn.query_row(sql, params![id, month], |r| r.get(0))?;
        Ok(Nanos::new(n))
    }

    /// Every key below `id`, oldest first.
    pub fn descendants(&self, id: &str) -> Result<Vec<KeyRecord>> {
        let sql = format!(
            "{}SELECT {KEY_COLUMNS} FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id
             WHERE k.id IN (SELECT id FROM tree) ORDER BY k.created_at, k.id",
            descendants_cte!("?1")
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([id], super::keys::key_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// (child, parent) for every minted key.
    pub fn key_parents(&self) -> Result<Vec<(String, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, parent_id FROM keys WHERE parent_id IS NOT NULL")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
