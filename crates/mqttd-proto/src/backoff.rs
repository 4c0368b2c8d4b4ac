//! How long to wait before trying to connect again: exponential backoff with jitter, so that
//! clients cut off together (a remote broker's restart, a relay's) do not come back in step.
//! Bridges use it between connection rounds, peer-to-peer nodes between connection attempts.
//!
//! Pure: the random number of the jitter is passed in ([`unit_from_bytes`] makes one from
//! random bytes the caller draws; with the `os-random` feature, `random_unit` draws them).

use std::time::Duration;

/// Waits that double from `min` to `max` with each failed attempt, each drawn between half the
/// step and the whole step ("equal jitter").
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Waits from `min` (the first) to `max` (the cap; at least `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The wait after one more failed attempt; `unit` is a random number in `[0, 1)`.
    pub fn next(&mut self, unit: f64) -> Duration {
        let step = self
            .min
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Failed attempts since the last [`Backoff::reset`].
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A connection was made: the next wait starts from `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A number in `[0, 1)` from 8 random bytes, for [`Backoff::next`].
pub fn unit_from_bytes(bytes: [u8; 8]) -> f64 {
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// A number in `[0, 1)` from the operating system's random source, for [`Backoff::next`];
/// 0.5 (no jitter) if the source fails.
#[cfg(feature = "os-random")]
pub fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    match getrandom::fill(&mut bytes) {
        Ok(()) => unit_from_bytes(bytes),
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_within_their_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let waits: Vec<_> = (0..6).map(|_| b.next(1.0)).collect();
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.failures(), 6);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        assert_eq!(
            b.next(0.0),
            Duration::from_millis(500),
            "half the step at least"
        );
        b.reset();
        assert_eq!(b.next(1.0), Duration::from_secs(1));
        // Many failures neither overflow nor pass the cap.
        for n in 0..100u8 {
            assert!(b.next(unit_from_bytes([n; 8])) <= Duration::from_secs(10));
        }
    }

    #[test]
    fn units_are_in_range() {
        assert_eq!(unit_from_bytes([0; 8]), 0.0);
        let top = unit_from_bytes([0xff; 8]);
        assert!((0.0..1.0).contains(&top), "{top}");
    }

    #[cfg(feature = "os-random")]
    #[test]
    fn random_units_are_in_range() {
        for _ in 0..1000 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }
}
