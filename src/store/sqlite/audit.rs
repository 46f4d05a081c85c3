//! The audit log in SQLite.

use rusqlite::params;

use super::Sqlite;
use crate::store::audit::AuditEntry;
use crate::store::Result;

impl Sqlite {
    pub fn record_audit(&mut self, e: &AuditEntry) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO audit (ts, door, actor, action, target, before, after)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![e.ts, e.door, e.actor, e.action, e.target, e.before, e.after],
            )?;
            Ok(())
        })
    }

    /// Newest first; `before` pages back.
    pub fn audit(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, ts, door, actor, action, target, before, after FROM audit
             WHERE id < ?2 ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit, before.unwrap_or(i64::MAX)], |r| {
            Ok(AuditEntry {
                id: r.get(0)?,
                ts: r.get(1)?,
                door: r.get(2)?,
                actor: r.get(3)?,
                action: r.get(4)?,
                target: r.get(5)?,
                before: r.get(6)?,
                after: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
