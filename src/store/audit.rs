//! The audit log as both backends store it: one row per management change.

/// One management change: through which door, by whom, what, and the object before and
/// after (JSON text of public fields only: never a secret or its hash).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditEntry {
    /// Row id once stored (0 before); newer entries have larger ids.
    pub id: i64,
    pub ts: i64,
    /// `cli`, `admin_api`, `dashboard` or `signal`.
    pub door: String,
    /// Who: the CLI user, the admin token's fingerprint, the signal.
    pub actor: String,
    /// `key.create`, `key.update`, `key.rotate`, `key.revoke`, `prices.import`,
    /// `config.reload`, `config.reload_failed`.
    pub action: String,
    /// What changed: a key id, a config file.
    pub target: String,
    pub before: Option<String>,
    pub after: Option<String>,
}
