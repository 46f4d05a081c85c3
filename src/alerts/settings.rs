//! The `alerts:` section: raw serde structs (unknown keys rejected) and their validation
//! into [`Alerts`], with errors naming the field path (`alerts.webhooks[0].secret_env: ...`).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::post::Target;
use super::AlertRules;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    #[serde(default)]
    webhooks: Vec<RawWebhook>,
    /// Fractions of a monthly budget; default 0.5, 0.8, 1.0.
    budget_thresholds: Option<Vec<f64>>,
    /// The first retry of a failed delivery waits this long; each further one twice as long.
    #[serde(default = "default_retry_base_ms")]
    retry_base_ms: u64,
    /// The longest wait between two attempts.
    #[serde(default = "default_retry_max_ms")]
    retry_max_ms: u64,
    /// A delivery still failing this long after its alert was recorded is given up (`failed`).
    #[serde(default = "default_retry_for_s")]
    retry_for_s: u64,
    /// Longest wait for one webhook POST (connect, send, response head).
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    /// How often the delivery worker looks for due deliveries.
    #[serde(default = "default_poll_ms")]
    poll_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    secret_env: String,
}

fn default_retry_base_ms() -> u64 {
    5_000
}
fn default_retry_max_ms() -> u64 {
    600_000
}
fn default_retry_for_s() -> u64 {
    7_200
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_poll_ms() -> u64 {
    500
}

/// The default `budget_thresholds`: 50 %, 80 % and 100 % of the budget.
pub const DEFAULT_THRESHOLDS_PPM: [u32; 3] = [500_000, 800_000, 1_000_000];

/// One webhook: where alerts go and the HMAC key they are signed with. `Debug` never shows
/// the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    pub secret: String,
    /// The variable the secret came from (for messages).
    pub secret_env: String,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("secret_env", &self.secret_env)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// When a failed delivery is tried again: `base`, doubling, at most `max` apart, until
/// `give_up` after the alert was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base_ms: i64,
    pub max_ms: i64,
    pub give_up_ms: i64,
}

impl RetryPolicy {
    /// After `attempts` failed attempts (>= 1) of an alert recorded at `created_at`: when to
    /// try again, or `None` once the give-up time has come. A try the back-off would put
    /// past the give-up time is made at it, so a delivery is retried for the whole of
    /// `give_up_ms` (SPEC §7: at least an hour), not until the back-off's last step before.
    pub fn next_attempt(&self, attempts: u32, created_at: i64, now: i64) -> Option<i64> {
        let doublings = attempts.saturating_sub(1).min(40);
        let delay = self
            .base_ms
            .saturating_mul(1_i64 << doublings)
            .min(self.max_ms);
        let give_up = created_at.saturating_add(self.give_up_ms);
        (now < give_up).then(|| now.saturating_add(delay).min(give_up))
    }
}

/// `alerts`, validated. Reloaded with the config on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alerts {
    pub webhooks: Vec<Webhook>,
    /// What the ledger writer records alerts with (thresholds, webhook URLs).
    pub rules: Arc<AlertRules>,
    pub retry: RetryPolicy,
    pub timeout: Duration,
    pub poll: Duration,
}

impl Alerts {
    pub fn webhook(&self, url: &str) -> Option<&Webhook> {
        self.webhooks.iter().find(|w| w.url == url)
    }
}

fn err<T>(path: impl std::fmt::Display, msg: impl std::fmt::Display) -> Result<T, String> {
    Err(format!("{path}: {msg}"))
}

/// Validates `alerts`; secrets are read from their environment variables now, so
/// `check-config` reports a missing one. Errors name the field path.
pub fn parse(raw: RawAlerts) -> Result<Alerts, String> {
    if raw.webhooks.is_empty() {
        return err("alerts.webhooks", "at least one webhook is required");
    }
    let mut webhooks: Vec<Webhook> = Vec::with_capacity(raw.webhooks.len());
    for (i, w) in raw.webhooks.into_iter().enumerate() {
        let at = format!("alerts.webhooks[{i}]");
        if let Err(e) = Target::parse(&w.url) {
            return err(format!("{at}.url"), e);
        }
        if webhooks.iter().any(|seen| seen.url == w.url) {
            return err(
                format!("{at}.url"),
                format!("duplicate webhook \"{}\"", w.url),
            );
        }
        if w.secret_env.trim().is_empty() {
            return err(
                format!("{at}.secret_env"),
                "must name an environment variable",
            );
        }
        let secret = match std::env::var(&w.secret_env) {
            Ok(s) if !s.is_empty() => s,
            _ => {
                return err(
                    format!("{at}.secret_env"),
                    format!("environment variable {} is not set", w.secret_env),
                )
            }
        };
        webhooks.push(Webhook {
            url: w.url,
            secret,
            secret_env: w.secret_env,
        });
    }
    let thresholds_ppm = match raw.budget_thresholds {
        None => DEFAULT_THRESHOLDS_PPM.to_vec(),
        Some(list) => {
            let mut ppm = Vec::with_capacity(list.len());
            for (i, t) in list.iter().enumerate() {
                if !(t.is_finite() && *t > 0.0 && *t <= 1.0) {
                    return err(
                        format!("alerts.budget_thresholds[{i}]"),
                        format!("{t} is not a fraction in (0, 1]"),
                    );
                }
                // Millionths: exact integer comparisons in the ledger, and 0.8 stays 0.8.
                ppm.push(((t * 1e6).round() as u32).max(1));
            }
            ppm.sort_unstable();
            ppm.dedup();
            ppm
        }
    };
    if !(10..=60_000).contains(&raw.retry_base_ms) {
        return err("alerts.retry_base_ms", "must be between 10 and 60000");
    }
    if raw.retry_max_ms < raw.retry_base_ms || raw.retry_max_ms > 3_600_000 {
        return err(
            "alerts.retry_max_ms",
            "must be between retry_base_ms and 3600000",
        );
    }
    // SPEC §7: a failed delivery is retried for at least an hour.
    if !(3_600..=604_800).contains(&raw.retry_for_s) {
        return err("alerts.retry_for_s", "must be between 3600 and 604800");
    }
    if !(100..=60_000).contains(&raw.timeout_ms) {
        return err("alerts.timeout_ms", "must be between 100 and 60000");
    }
    if !(50..=5_000).contains(&raw.poll_ms) {
        return err("alerts.poll_ms", "must be between 50 and 5000");
    }
    Ok(Alerts {
        rules: Arc::new(AlertRules {
            thresholds_ppm,
            webhooks: webhooks.iter().map(|w| w.url.clone()).collect(),
        }),
        webhooks,
        retry: RetryPolicy {
            base_ms: raw.retry_base_ms as i64,
            max_ms: raw.retry_max_ms as i64,
            give_up_ms: raw.retry_for_s as i64 * 1000,
        },
        timeout: Duration::from_millis(raw.timeout_ms),
        poll: Duration::from_millis(raw.poll_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> RawAlerts {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn thresholds_default_sort_and_dedup() {
        std::env::set_var("SG_ALERT_TEST_SECRET", "s3cret");
        let hook = "webhooks: [{url: \"http://127.0.0.1:9/h\", secret_env: SG_ALERT_TEST_SECRET}]";
        let a = parse(raw(hook)).unwrap();
        assert_eq!(a.rules.thresholds_ppm, DEFAULT_THRESHOLDS_PPM);
        assert_eq!(a.webhooks[0].secret, "s3cret");
        assert!(!format!("{a:?}").contains("s3cret"), "secret redacted");
        let a = parse(raw(&format!(
            "{hook}\nbudget_thresholds: [1.0, 0.8, 0.5, 0.8]"
        )))
        .unwrap();
        assert_eq!(a.rules.thresholds_ppm, vec![500_000, 800_000, 1_000_000]);
        for bad in ["0", "1.5", "-0.1", ".nan"] {
            let e = parse(raw(&format!("{hook}\nbudget_thresholds: [0.5, {bad}]"))).unwrap_err();
            assert!(e.starts_with("alerts.budget_thresholds[1]:"), "{e}");
        }
    }

    #[test]
    fn errors_name_the_field_path() {
        std::env::set_var("SG_ALERT_TEST_SECRET2", "x");
        let e = parse(raw(
            "webhooks: [{url: \"http://127.0.0.1:9/h\", secret_env: SG_ALERT_TEST_UNSET_VAR}]",
        ))
        .unwrap_err();
        assert_eq!(
            e,
            "alerts.webhooks[0].secret_env: environment variable SG_ALERT_TEST_UNSET_VAR is not set"
        );
        let e = parse(raw(
            "webhooks: [{url: \"ftp://h/x\", secret_env: SG_ALERT_TEST_SECRET2}]",
        ))
        .unwrap_err();
        assert!(e.starts_with("alerts.webhooks[0].url:"), "{e}");
        let e = parse(raw("webhooks: []")).unwrap_err();
        assert!(e.starts_with("alerts.webhooks:"), "{e}");
        assert!(serde_yaml::from_str::<RawAlerts>("webhook: []").is_err());
        let e = parse(raw(
            "webhooks: [{url: \"http://h/x\", secret_env: SG_ALERT_TEST_SECRET2}]\nretry_for_s: 60",
        ))
        .unwrap_err();
        assert!(e.starts_with("alerts.retry_for_s:"), "{e}");
    }

    #[test]
    fn retries_double_from_the_base_up_to_the_cap_and_stop_after_the_give_up_time() {
        let p = RetryPolicy {
            base_ms: 5_000,
            max_ms: 600_000,
            give_up_ms: 7_200_000,
        };
        assert_eq!(
            p.next_attempt(1, 0, 0),
            Some(5_000),
            "first retry within a minute"
        );
        assert_eq!(p.next_attempt(2, 0, 0), Some(10_000));
        assert_eq!(p.next_attempt(8, 0, 0), Some(600_000), "capped");
        assert_eq!(p.next_attempt(60, 0, 0), Some(600_000), "no overflow");
        // Retries keep coming until the give-up time, the last one at it, then stop.
        let (mut now, mut attempts) = (0, 1);
        while let Some(at) = p.next_attempt(attempts, 0, now) {
            assert!(at > now && at <= 7_200_000, "{at} after {now}");
            now = at;
            attempts += 1;
        }
        assert_eq!(now, 7_200_000);
        // The shortest allowed: an hour, whatever the back-off's steps.
        let hour = RetryPolicy {
            base_ms: 5_000,
            max_ms: 600_000,
            give_up_ms: 3_600_000,
        };
        let (mut now, mut attempts) = (0, 1);
        while let Some(at) = hour.next_attempt(attempts, 0, now) {
            now = at;
            attempts += 1;
        }
        assert_eq!(now, 3_600_000, "the last try is an hour after the alert");
        assert_eq!(hour.next_attempt(3, 0, 3_599_000), Some(3_600_000));
        assert_eq!(hour.next_attempt(3, 0, 3_600_000), None);
    }
}
