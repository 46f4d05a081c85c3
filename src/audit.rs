//! Who changed what: the actor of a management change, the public view of a key recorded
//! before and after it, and the JSON an audit entry is shown as. Never a secret: keys are
//! recorded without their hash, the admin token only as a short fingerprint.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::clock::rfc3339;
use crate::keys::KeyRecord;
use crate::money::Nanos;
use crate::store::{AuditEntry, Store};

/// The door a change came through and who used it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// `cli`, `admin_api`, `dashboard` or `signal`.
    pub door: &'static str,
    pub who: String,
}

impl Actor {
    /// The CLI, as the operating-system user running it.
    pub fn cli() -> Actor {
        let user = ["SUDO_USER", "USER", "LOGNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "unknown".into());
        Actor {
            door: "cli",
            who: format!("user {user}"),
        }
    }

    /// The admin API (or the dashboard, which calls it), as the admin token it carried:
    /// named by the first 12 hex digits of its SHA-256, enough to tell tokens apart across a
    /// rotation and useless for signing in.
    pub fn admin(bearer: &[u8], dashboard: bool) -> Actor {
        let token = crate::keys::token::bearer(bearer).unwrap_or(bearer);
        let digest = Sha256::digest(token);
        let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        Actor {
            door: if dashboard { "dashboard" } else { "admin_api" },
            who: format!("admin token sha256:{hex}"),
        }
    }

    /// An agent minting or revoking its own child keys through `/v1/keys`, as its key.
    pub fn agent(key_id: &str) -> Actor {
        Actor {
            door: "agent_api",
            who: format!("key {key_id}"),
        }
    }

    /// A signal to the running gateway (SIGHUP).
    pub fn signal(name: &str) -> Actor {
        Actor {
            door: "signal",
            who: format!("{name} to pid {}", std::process::id()),
        }
    }
}

/// A key's public fields, as recorded before and after a change (no secret, no hash).
pub fn key_view(k: &KeyRecord) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "scopes": k.scopes,
        "rpm": k.rpm,
        "rpd": k.rpd,
        "monthly_budget_usd": k.budget.map(Nanos::as_usd),
        "budget_mode": k.budget_mode.as_str(),
        "max_inflight": k.max_inflight,
        "max_usd_per_hour": k.max_usd_per_hour.map(Nanos::as_usd),
        "loop_limit": k.loop_limit,
        "allowed_models": k.allowed_models,
        "free_only": k.free_only,
        "client_id": k.client_id,
        "group": k.group,
        "parent_id": k.parent_id,
        "expires_at": rfc3339(k.expires_at),
        "revoked_at": k.revoked_at.map(rfc3339),
    })
}

/// Appends one change to the store's audit log. A failure is logged, not returned: the change
/// itself is already committed, and the door must still report it.
pub fn record(
    store: &mut Store,
    actor: &Actor,
    action: &str,
    target: &str,
    before: Option<Value>,
    after: Option<Value>,
    now: i64,
) {
    let entry = AuditEntry {
        id: 0,
        ts: now,
        door: actor.door.to_string(),
        actor: actor.who.clone(),
        action: action.to_string(),
        target: target.to_string(),
        before: before.map(|v| v.to_string()),
        after: after.map(|v| v.to_string()),
    };
    if let Err(e) = store.record_audit(&entry) {
        log::error!(
            "audit: could not record {action} of {target} by {}: {e}",
            actor.who
        );
    }
}

/// An entry as the CLI's `--json` and `GET /admin/audit` show it.
pub fn entry_json(e: &AuditEntry) -> Value {
    let parse = |t: &Option<String>| {
        t.as_deref()
            .map(|s| serde_json::from_str::<Value>(s).unwrap_or(Value::String(s.to_string())))
            .unwrap_or(Value::Null)
    };
    json!({
        "id": e.id,
        "time": rfc3339(e.ts),
        "ts_ms": e.ts,
        "door": e.door,
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "before": parse(&e.before),
        "after": parse(&e.after),
    })
}
