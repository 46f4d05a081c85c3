//! Money: [`Nanos`] (integer nano-dollars) and [`Price`] (per token). Arithmetic saturates,
//! so no request shape (a `max_tokens` of 2^64-1, `n` of 128) can wrap a cost into a small one.

use std::fmt;
use std::ops::{Add, AddAssign, Sub, SubAssign};

/// An amount of US dollars in integer nano-dollars. Sums saturate at `Nanos::MAX`, which is
/// far above any real budget (9.2 billion USD), so a saturated cost is simply "too much".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nanos(i64);

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);
    pub const MAX: Nanos = Nanos(i64::MAX);

    pub const fn new(nanos: i64) -> Nanos {
        Nanos(nanos)
    }

    /// The raw count, for storage and JSON.
    pub const fn get(self) -> i64 {
        self.0
    }

    /// A USD amount given by a person (CLI, API): finite, 0..=1e9, rounded to the nano.
    pub fn from_usd(usd: f64) -> Option<Nanos> {
        (usd.is_finite() && (0.0..=1.0e9).contains(&usd)).then(|| Nanos((usd * 1e9).round() as i64))
    }

    /// As a float of dollars, for JSON answers only (never summed).
    pub fn as_usd(self) -> f64 {
        self.0 as f64 / 1e9
    }

    pub fn max(self, other: Nanos) -> Nanos {
        Nanos(self.0.max(other.0))
    }
}

impl Add for Nanos {
    type Output = Nanos;
    fn add(self, rhs: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Nanos {
    fn add_assign(&mut self, rhs: Nanos) {
        *self = *self + rhs;
    }
}

impl Sub for Nanos {
    type Output = Nanos;
    fn sub(self, rhs: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(rhs.0))
    }
}

impl SubAssign for Nanos {
    fn sub_assign(&mut self, rhs: Nanos) {
        *self = *self - rhs;
    }
}

impl std::iter::Sum for Nanos {
    fn sum<I: Iterator<Item = Nanos>>(iter: I) -> Nanos {
        iter.fold(Nanos::ZERO, Add::add)
    }
}

impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let micros = self.0.unsigned_abs().saturating_add(500) / 1000;
        write!(f, "{sign}{}.{:06}", micros / 1_000_000, micros % 1_000_000)
    }
}

/// A price per token in pico-dollars (1e-12 USD), so cheap models (0.0375 USD per million
/// tokens = 37,500 pico-dollars) are exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Price(u64);

/// Pico-dollars per token in one USD per million tokens.
const PICO_PER_TOKEN_PER_USD_MTOK: f64 = 1e6;

impl Price {
    pub const FREE: Price = Price(0);

    /// From the config's USD per million tokens: finite, 0..=1e6.
    pub fn per_mtok(usd_per_mtok: f64) -> Option<Price> {
        (usd_per_mtok.is_finite() && (0.0..=1.0e6).contains(&usd_per_mtok))
            .then(|| Price((usd_per_mtok * PICO_PER_TOKEN_PER_USD_MTOK).round() as u64))
    }

    pub const fn pico_per_token(self) -> u64 {
        self.0
    }

    /// Back to USD per million tokens (for reports; exact to the pico-dollar per token).
    pub fn usd_per_mtok(self) -> f64 {
        self.0 as f64 / PICO_PER_TOKEN_PER_USD_MTOK
    }

    /// The cost of `tokens` tokens, rounded up to the nano-dollar (a charge is never rounded
    /// down to free), saturating at [`Nanos::MAX`].
    pub fn cost(self, tokens: u64) -> Nanos {
        let pico = tokens as u128 * self.0 as u128;
        let nanos = pico.div_ceil(1000);
        Nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_six_decimals() {
        assert_eq!(Nanos::new(1_500_000_000).to_string(), "1.500000");
        assert_eq!(Nanos::new(1_234).to_string(), "0.000001");
        assert_eq!(Nanos::ZERO.to_string(), "0.000000");
        assert_eq!(Nanos::new(-2_000).to_string(), "-0.000002");
        assert_eq!(Nanos::MAX.to_string(), "9223372036.854776");
    }

    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        assert_eq!(Nanos::MAX + Nanos::new(1), Nanos::MAX);
        assert_eq!(Nanos::new(i64::MIN) - Nanos::new(1), Nanos::new(i64::MIN));
        let p = Price::per_mtok(1_000_000.0).unwrap();
        assert_eq!(p.cost(u64::MAX), Nanos::MAX);
        assert_eq!(p.cost((1 << 63) + 7), Nanos::MAX);
    }

    #[test]
    fn prices_are_exact_and_costs_round_up() {
        let p = Price::per_mtok(0.15).unwrap();
        assert_eq!(p.pico_per_token(), 150_000);
        // 1 USD per Mtok is 1000 nano-dollars per token.
        assert_eq!(
            Price::per_mtok(1.0).unwrap().cost(1_000),
            Nanos::new(1_000_000)
        );
        let cheap = Price::per_mtok(0.0375).unwrap();
        assert_eq!(cheap.cost(1), Nanos::new(38), "37.5 nano-dollars round up");
        assert_eq!(cheap.cost(2), Nanos::new(75));
        assert_eq!(Price::FREE.cost(u64::MAX), Nanos::ZERO);
        assert!(Price::per_mtok(-1.0).is_none());
        assert!(Price::per_mtok(f64::NAN).is_none());
    }

    #[test]
    fn usd_input_is_bounded() {
        assert_eq!(Nanos::from_usd(1.5), Some(Nanos::new(1_500_000_000)));
        assert_eq!(Nanos::from_usd(-0.01), None);
        assert_eq!(Nanos::from_usd(f64::INFINITY), None);
        assert_eq!(Nanos::from_usd(2e9), None);
    }
}
