//! UTC calendar arithmetic on unix milliseconds: days, months, RFC 3339. No time zones, no deps.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub const MS_PER_DAY: i64 = 86_400_000;

/// Environment variable adding a signed offset (ms) to the wall clock, so tests and drills
/// can put the gateway just before a month or day boundary. Read once per process.
pub const CLOCK_OFFSET_ENV: &str = "SPIDERGATE_CLOCK_OFFSET_MS";

fn offset_ms() -> i64 {
    static OFFSET: OnceLock<i64> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var(CLOCK_OFFSET_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// No wall-clock reading is earlier than this (unix ms; 0 until raised).
static WALL_FLOOR: AtomicI64 = AtomicI64::new(0);

/// Wall-clock now in unix milliseconds (plus the configured test offset, if any), never
/// earlier than [`raise_wall_floor`] set.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        .saturating_add(offset_ms())
        .max(WALL_FLOOR.load(Ordering::Relaxed))
}

/// Holds [`now_ms`] at `ms` or later. A gateway started with its clock set back (a step of
/// NTP, a wrong hardware clock after a reboot) would otherwise count a day or a month that
/// already ended again, from zero (SPEC §2: counters never roll backwards): it starts from
/// the newest time its store recorded, and the clock takes over once it passes it.
pub fn raise_wall_floor(ms: i64) {
    WALL_FLOOR.fetch_max(ms, Ordering::Relaxed);
}

/// Environment variable that lets a test move the monotonic clock forward through the admin
/// API (`POST /admin/test/advance-clock?ms=N`), so a rolling-minute Retry-After is checked
/// without waiting a real minute. Off (the route answers 404) unless set to `1`.
pub const TEST_CLOCK_ENV: &str = "SPIDERGATE_TEST_CLOCK";

/// Milliseconds the test clock has been advanced (always 0 outside tests).
static MONO_ADVANCE: AtomicI64 = AtomicI64::new(0);

/// Whether [`TEST_CLOCK_ENV`] is `1` in this process (read once).
pub fn test_clock_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(TEST_CLOCK_ENV).is_ok_and(|v| v.trim() == "1"))
}

/// Moves [`mono_ms`] forward by `ms` (tests only: refused unless [`test_clock_enabled`]).
pub fn advance_mono(ms: i64) -> bool {
    if !test_clock_enabled() || ms < 0 {
        return false;
    }
    MONO_ADVANCE.fetch_add(ms, Ordering::Relaxed);
    true
}

/// Milliseconds on a monotonic clock (since the first call in this process): immune to
/// wall-clock steps, so rolling windows measure real elapsed time. (Plus what a test
/// advanced it by: one relaxed load, 0 in production.)
pub fn mono_ms() -> i64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64
        + MONO_ADVANCE.load(Ordering::Relaxed)
}

/// The two clocks an admission decision reads, taken together at the moment of decision:
/// `wall` for calendar days and months, `mono` for the rolling minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub wall: i64,
    pub mono: i64,
}

impl Now {
    pub fn read() -> Now {
        Now {
            wall: now_ms(),
            mono: mono_ms(),
        }
    }

    /// For tests and tools: both clocks at the same reading.
    pub const fn at(ms: i64) -> Now {
        Now { wall: ms, mono: ms }
    }
}

/// Days since 1970-01-01 for a civil date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date (year, month 1-12, day 1-31) for days since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

/// UTC day number of a timestamp.
pub fn day_index(ms: i64) -> i64 {
    ms.div_euclid(MS_PER_DAY)
}

/// A calendar month as `year * 12 + (month - 1)`: consecutive months are consecutive numbers.
pub fn month_index(ms: i64) -> i64 {
    let (y, m, _) = civil_from_days(day_index(ms));
    y * 12 + (m as i64 - 1)
}

/// Unix ms of 00:00 UTC on the first day of a month index.
pub fn month_start_ms(month: i64) -> i64 {
    let y = month.div_euclid(12);
    let m = month.rem_euclid(12) as u32 + 1;
    days_from_civil(y, m, 1) * MS_PER_DAY
}

/// `YYYY-MM` for a month index.
pub fn month_label(month: i64) -> String {
    format!(
        "{:04}-{:02}",
        month.div_euclid(12),
        month.rem_euclid(12) + 1
    )
}

/// Parses `YYYY-MM` into a month index.
pub fn parse_month(s: &str) -> Option<i64> {
    let (y, m) = s.split_once('-')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    let y: i64 = y.parse().ok()?;
    let m: i64 = m.parse().ok()?;
    (1..=12).contains(&m).then_some(y * 12 + m - 1)
}

/// `YYYY-MM-DD` for a UTC day number.
pub fn day_label(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// RFC 3339 in UTC with second precision, e.g. `2026-11-26T15:52:27Z`.
pub fn rfc3339(ms: i64) -> String {
    let (y, m, d) = civil_from_days(day_index(ms));
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for day in [-1000, 0, 1, 59, 365, 10_957, 20_000, 20_818, 30_000] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn months_roll_over_at_utc_midnight_on_the_first() {
        let end_of_nov = days_from_civil(2026, 11, 30) * MS_PER_DAY + MS_PER_DAY - 1;
        let first_of_dec = end_of_nov + 1;
        assert_eq!(month_index(first_of_dec), month_index(end_of_nov) + 1);
        assert_eq!(month_label(month_index(first_of_dec)), "2026-12");
        assert_eq!(month_start_ms(month_index(end_of_nov) + 1), first_of_dec);
        assert_eq!(
            month_label(month_index(days_from_civil(2026, 12, 31) * MS_PER_DAY) + 1),
            "2027-01"
        );
        assert_eq!(parse_month("2027-01"), Some(2027 * 12));
        assert_eq!(parse_month("2027-13"), None);
    }

    #[test]
    fn rfc3339_formats_utc() {
        let ms = days_from_civil(2026, 11, 26) * MS_PER_DAY + (15 * 3600 + 52 * 60 + 27) * 1000;
        assert_eq!(rfc3339(ms), "2026-11-26T15:52:27Z");
        assert_eq!(day_label(day_index(ms)), "2026-11-26");
    }
}
