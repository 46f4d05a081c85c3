//! Budget and brake alerts: which thresholds a spend crossed, the alert's payload, id and
//! signature. The ledger writer records alerts in an outbox in the same transaction as the
//! spend that crossed them (`store::alerts`); `deliver` POSTs the outbox to the webhooks
//! from its own thread, never from the request path.

pub mod deliver;
mod post;
pub mod settings;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::clock::{day_label, month_label};
use crate::money::Nanos;

pub use settings::{Alerts, RawAlerts, RetryPolicy, Webhook};

/// A key's or a group's month-to-date spend reached a configured fraction of its budget.
pub const BUDGET_THRESHOLD: &str = "budget.threshold";
/// A key was refused with `spend_rate_exceeded` (its `max_usd_per_hour`).
pub const KEY_SPEND_RATE: &str = "key.spend_rate";
/// A key was refused with `loop_detected` (its `loop_limit`).
pub const KEY_LOOP: &str = "key.loop";

const MS_PER_HOUR: i64 = 3_600_000;

/// The alert event a refusal's `error.code` raises (once per key per UTC hour), if any.
pub fn brake_event(error_code: &str) -> Option<&'static str> {
    match error_code {
        "spend_rate_exceeded" => Some(KEY_SPEND_RATE),
        "loop_detected" => Some(KEY_LOOP),
        _ => None,
    }
}

/// What the ledger writer needs to record alerts: the thresholds (millionths of a budget,
/// ascending, distinct) and the webhook URLs each new alert gets a delivery row for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertRules {
    pub thresholds_ppm: Vec<u32>,
    pub webhooks: Vec<String>,
}

/// Whose budget an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind {
    Key,
    Group,
}

impl SubjectKind {
    pub fn label(self) -> &'static str {
        match self {
            SubjectKind::Key => "key",
            SubjectKind::Group => "group",
        }
    }

    /// The payload field that names the subject.
    fn field(self) -> &'static str {
        match self {
            SubjectKind::Key => "key_id",
            SubjectKind::Group => "group",
        }
    }
}

/// One alert as the outbox stores it. `(kind, subject, event, period, threshold_ppm)` is
/// unique: inserting it again (another batch, a restart, another node) changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAlert {
    pub id: String,
    pub kind: SubjectKind,
    pub subject: String,
    pub event: &'static str,
    /// `YYYY-MM` for budget thresholds, `YYYY-MM-DDTHH` (UTC hour) for brake alerts.
    pub period: String,
    /// Millionths of the budget; 0 for brake alerts.
    pub threshold_ppm: i64,
    /// The exact JSON body every delivery of this alert sends (and signs).
    pub payload: String,
}

/// The alert's idempotency id: derived from its unique tuple, so every node and every
/// retry names the same alert the same way (`alrt_` + 32 hex digits).
pub fn alert_id(kind: SubjectKind, subject: &str, event: &str, period: &str, ppm: i64) -> String {
    let mut h = Sha256::new();
    for part in [kind.label(), subject, event, period, &ppm.to_string()] {
        h.update(part.as_bytes());
        // A separator no field contains, so ("ab","c") and ("a","bc") differ.
        h.update([0u8]);
    }
    let digest = h.finalize();
    let mut id = String::with_capacity(37);
    id.push_str("alrt_");
    for b in &digest[..16] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// The thresholds (ppm) that `spend` has reached against a positive `budget`, exactly in
/// integers (no float rounding at the boundary).
pub fn crossed(thresholds_ppm: &[u32], spend: Nanos, budget: Nanos) -> Vec<u32> {
    if budget.get() <= 0 {
        return Vec::new();
    }
    let spend = i128::from(spend.get()) * 1_000_000;
    let budget = i128::from(budget.get());
    thresholds_ppm
        .iter()
        .copied()
        .filter(|&t| spend >= i128::from(t) * budget)
        .collect()
}

/// The budget alerts of one key or group for one month (`month` as `clock::month_index`):
/// one per threshold reached. The caller inserts them idempotently.
pub fn budget_alerts(
    rules: &AlertRules,
    kind: SubjectKind,
    subject: &str,
    name: &str,
    month: i64,
    spend: Nanos,
    budget: Nanos,
) -> Vec<NewAlert> {
    let period = month_label(month);
    crossed(&rules.thresholds_ppm, spend, budget)
        .into_iter()
        .map(|ppm| {
            let ppm = i64::from(ppm);
            let id = alert_id(kind, subject, BUDGET_THRESHOLD, &period, ppm);
            let mut body = json!({
                "event": BUDGET_THRESHOLD,
                "id": id,
                "name": name,
                "threshold": ppm as f64 / 1e6,
                "spend_usd": spend.as_usd(),
                "budget_usd": budget.as_usd(),
                "month": period,
            });
            body[kind.field()] = json!(subject);
            NewAlert {
                id,
                kind,
                subject: subject.to_string(),
                event: BUDGET_THRESHOLD,
                period: period.clone(),
                threshold_ppm: ppm,
                payload: body.to_string(),
            }
        })
        .collect()
}

/// `YYYY-MM-DDTHH` of a UTC hour index (`ms / 3_600_000`).
pub fn hour_label(hour: i64) -> String {
    format!(
        "{}T{:02}",
        day_label(hour.div_euclid(24)),
        hour.rem_euclid(24)
    )
}

/// The UTC hour index of a timestamp.
pub fn hour_index(ms: i64) -> i64 {
    ms.div_euclid(MS_PER_HOUR)
}

/// A brake alert (`key.spend_rate` / `key.loop`) of one key for one UTC hour, with the
/// key's month-to-date standing at the time.
pub fn brake_alert(
    event: &'static str,
    key_id: &str,
    name: &str,
    hour: i64,
    month: i64,
    spend: Nanos,
    budget: Option<Nanos>,
) -> NewAlert {
    let period = hour_label(hour);
    let id = alert_id(SubjectKind::Key, key_id, event, &period, 0);
    let body = json!({
        "event": event,
        "id": id,
        "key_id": key_id,
        "name": name,
        "threshold": null,
        "hour": period,
        "month": month_label(month),
        "spend_usd": spend.as_usd(),
        "budget_usd": budget.map(Nanos::as_usd),
    });
    NewAlert {
        id,
        kind: SubjectKind::Key,
        subject: key_id.to_string(),
        event,
        period,
        threshold_ppm: 0,
        payload: body.to_string(),
    }
}

/// `X-SpiderGate-Signature`: `sha256=` + lowercase hex HMAC-SHA256 of the exact body bytes.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    // HMAC takes a key of any length (RFC 2104): this never fails.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{days_from_civil, month_index, MS_PER_DAY};

    fn rules() -> AlertRules {
        AlertRules {
            thresholds_ppm: vec![500_000, 800_000, 1_000_000],
            webhooks: vec!["http://127.0.0.1:9/hook".into()],
        }
    }

    #[test]
    fn thresholds_are_crossed_exactly_at_the_boundary() {
        let t = rules().thresholds_ppm;
        let budget = Nanos::new(3_000_000_000);
        assert!(crossed(&t, Nanos::new(1_499_999_999), budget).is_empty());
        assert_eq!(
            crossed(&t, Nanos::new(1_500_000_000), budget),
            vec![500_000]
        );
        assert_eq!(
            crossed(&t, Nanos::new(2_400_000_000), budget),
            vec![500_000, 800_000]
        );
        assert_eq!(crossed(&t, Nanos::new(9_000_000_000), budget).len(), 3);
        assert!(
            crossed(&t, Nanos::new(5), Nanos::new(0)).is_empty(),
            "no budget"
        );
        assert_eq!(
            crossed(&t, Nanos::new(i64::MAX), Nanos::new(i64::MAX)).len(),
            3
        );
    }

    #[test]
    fn budget_payload_names_the_subject_and_the_exact_figures() {
        let month = month_index(days_from_civil(2026, 12, 5) * MS_PER_DAY);
        let alerts = budget_alerts(
            &rules(),
            SubjectKind::Key,
            "key_1",
            "agent",
            month,
            Nanos::new(600_000_000),
            Nanos::new(1_000_000_000),
        );
        assert_eq!(alerts.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&alerts[0].payload).unwrap();
        assert_eq!(v["event"], "budget.threshold");
        assert_eq!(v["key_id"], "key_1");
        assert!(v.get("group").is_none());
        assert_eq!(v["name"], "agent");
        assert_eq!(v["threshold"], 0.5);
        assert_eq!(v["spend_usd"], 0.6);
        assert_eq!(v["budget_usd"], 1.0);
        assert_eq!(v["month"], "2026-12");
        assert_eq!(v["id"], alerts[0].id.as_str());
        let group = budget_alerts(
            &rules(),
            SubjectKind::Group,
            "team",
            "team",
            month,
            Nanos::new(1_000_000_000),
            Nanos::new(1_000_000_000),
        );
        let v: serde_json::Value = serde_json::from_str(&group[2].payload).unwrap();
        assert_eq!(
            (v["group"].as_str(), v["threshold"].as_f64()),
            (Some("team"), Some(1.0))
        );
        assert!(v.get("key_id").is_none());
    }

    #[test]
    fn ids_are_stable_and_distinct_per_tuple() {
        let a = alert_id(SubjectKind::Key, "k", BUDGET_THRESHOLD, "2026-12", 500_000);
        assert_eq!(
            a,
            alert_id(SubjectKind::Key, "k", BUDGET_THRESHOLD, "2026-12", 500_000)
        );
        assert!(a.starts_with("alrt_") && a.len() == 37);
        for other in [
            alert_id(
                SubjectKind::Group,
                "k",
                BUDGET_THRESHOLD,
                "2026-12",
                500_000,
            ),
            alert_id(SubjectKind::Key, "k", BUDGET_THRESHOLD, "2026-11", 500_000),
            alert_id(SubjectKind::Key, "k", BUDGET_THRESHOLD, "2026-12", 800_000),
            alert_id(SubjectKind::Key, "k", KEY_LOOP, "2026-12", 500_000),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn brake_alerts_are_per_utc_hour() {
        let ms = days_from_civil(2026, 12, 5) * MS_PER_DAY + 3 * MS_PER_HOUR + 59 * 60_000;
        let hour = hour_index(ms);
        assert_eq!(hour_label(hour), "2026-12-05T03");
        let a = brake_alert(
            KEY_LOOP,
            "key_1",
            "agent",
            hour,
            month_index(ms),
            Nanos::new(0),
            None,
        );
        let b = brake_alert(
            KEY_LOOP,
            "key_1",
            "agent",
            hour + 1,
            month_index(ms),
            Nanos::new(0),
            None,
        );
        assert_ne!(a.id, b.id);
        let v: serde_json::Value = serde_json::from_str(&a.payload).unwrap();
        assert_eq!(v["event"], "key.loop");
        assert_eq!(v["hour"], "2026-12-05T03");
        assert!(v["budget_usd"].is_null());
        assert_eq!(brake_event("spend_rate_exceeded"), Some(KEY_SPEND_RATE));
        assert_eq!(brake_event("rate_limit_exceeded"), None);
    }

    #[test]
    fn signature_is_the_rfc4231_hmac() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
