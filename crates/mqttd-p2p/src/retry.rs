//! Connection retries ([`crate::Node::connect_with_retry`]): exponential backoff with
//! jitter between attempts, bounded by a number of attempts and a deadline.
//!
//! iroh itself tries each path of one connection attempt (it resends Initials, punches holes
//! again every 5 s while the candidates stay the same, and moves to a direct path whenever
//! one works); none of that is configurable in iroh 1.4. What fails at once is the attempt as
//! a whole (the relay not reached yet, the peer refusing, a handshake that times out), and
//! that is what is retried here: after 200 ms, then twice as long each time up to 3 s, each
//! wait drawn between half and all of its step so that clients cut off together come back
//! apart ([`mqttd_proto::backoff`], the schedule bridges use too).

use std::time::Duration;

use mqttd_proto::backoff::Backoff;

/// How [`crate::Node::connect_with_retry`] tries again. Start from [`Retry::new`] and
/// assign the fields to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retry {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
    /// Attempts at most (the first included); 1 tries once.
    pub attempts: u32,
    /// The time allowed for all attempts and waits.
    pub deadline: Duration,
}

impl Retry {
    /// Waits from 200 ms doubling up to 3 s, at most 8 attempts, all within `deadline`.
    pub fn new(deadline: Duration) -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(3),
            attempts: 8,
            deadline,
        }
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.initial, self.max)
    }

    /// After a failed attempt: the wait before the next one (`unit` is the jitter, in
    /// `[0, 1)`), or `None` when the attempts are used up or the wait would not end within
    /// the `left` of the deadline. [`crate::Node::connect_with_retry`] asks this.
    pub(crate) fn after_failure(
        &self,
        backoff: &mut Backoff,
        left: Duration,
        unit: f64,
    ) -> Option<Duration> {
        let attempts = backoff.failures() + 1;
        let wait = backoff.next(unit);
        (attempts < self.attempts && wait < left).then_some(wait)
    }

    /// The waits between attempts, for `units` of jitter in `[0, 1)` (one per wait), if every
    /// attempt failed at once: the schedule, with no clock and no randomness.
    pub fn schedule(&self, units: &[f64]) -> Vec<Duration> {
        let mut backoff = self.backoff();
        let mut left = self.deadline;
        let mut waits = Vec::new();
        for &unit in units {
            let Some(wait) = self.after_failure(&mut backoff, left, unit) else {
                break;
            };
            left -= wait;
            waits.push(wait);
        }
        waits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(waits: &[Duration]) -> Vec<u128> {
        waits.iter().map(Duration::as_millis).collect()
    }

    #[test]
    fn waits_double_from_200_ms_to_3_s() {
        let retry = Retry::new(Duration::from_secs(60));
        assert_eq!(
            ms(&retry.schedule(&[1.0; 10])),
            [200, 400, 800, 1600, 3000, 3000, 3000],
            "at most 8 attempts: 7 waits"
        );
        assert_eq!(
            ms(&retry.schedule(&[0.0; 3])),
            [100, 200, 400],
            "half a step at least"
        );
    }

    #[test]
    fn the_deadline_bounds_the_waits() {
        let retry = Retry::new(Duration::from_secs(2));
        // 200 + 400 + 800 = 1400 ms fit; 1600 more do not.
        assert_eq!(ms(&retry.schedule(&[1.0; 10])), [200, 400, 800]);
        let mut once = Retry::new(Duration::from_secs(60));
        once.attempts = 1;
        assert!(once.schedule(&[1.0; 10]).is_empty());
    }
}
