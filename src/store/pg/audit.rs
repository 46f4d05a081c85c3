//! The audit log in PostgreSQL (shared by every node).

use super::Postgres;
use crate::store::audit::AuditEntry;
use crate::store::Result;

impl Postgres {
    pub fn record_audit(&mut self, e: &AuditEntry) -> Result<()> {
        self.execute(
            "INSERT INTO audit (ts, door, actor, action, target, before, after)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &e.ts, &e.door, &e.actor, &e.action, &e.target, &e.before, &e.after,
            ],
        )?;
        Ok(())
    }

    /// Newest first; `before` pages back.
    pub fn audit(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        let rows = self.query(
            "SELECT id, ts, door, actor, action, target, before, after FROM audit
             WHERE id < $2 ORDER BY id DESC LIMIT $1",
            &[&i64::from(limit), &before.unwrap_or(i64::MAX)],
        )?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get(0)?,
                    ts: r.try_get(1)?,
                    door: r.try_get(2)?,
                    actor: r.try_get(3)?,
                    action: r.try_get(4)?,
                    target: r.try_get(5)?,
                    before: r.try_get(6)?,
                    after: r.try_get(7)?,
                })
            })
            .collect()
    }
}
