//! How long a bridge waits before it tries to connect again: exponential backoff with jitter,
//! so that bridges cut off together (a remote broker's restart) do not come back in step.

use std::time::Duration;

/// Waits that double from `min` to `max` with each failed round, each drawn between half the
/// step and the whole step ("equal jitter").
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The wait after one more failed round; `unit` is a random number in `[0, 1)`.
    pub(crate) fn next(&mut self, unit: f64) -> Duration {
        let step = self
            .min
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// A connection was made: the next wait starts from `min` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A random number in `[0, 1)`, for the jitter.
pub(crate) fn unit() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
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
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        assert_eq!(
            b.next(0.0),
            Duration::from_millis(500),
            "half the step at least"
        );
        b.reset();
        assert_eq!(b.next(1.0), Duration::from_secs(1));
        // Many failures neither overflow nor pass the cap.
        for _ in 0..100 {
            assert!(b.next(unit()) <= Duration::from_secs(10));
        }
    }

    #[test]
    fn unit_is_in_range() {
        for _ in 0..1000 {
            let u = unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }
}
