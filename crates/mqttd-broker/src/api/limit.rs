//! The limit on failed authentication attempts: a token bucket per source address.
//!
//! Each failed attempt takes a token from its source's bucket; a source whose bucket is empty
//! is answered 429 before its key is even looked at, until a token comes back. A successful
//! attempt takes nothing. Sans-IO: time is passed in.
//!
//! IPv6 sources are grouped by /64, what one host usually holds. The table is bounded: past
//! [`MAX_SOURCES`] sources, full buckets (sources with no recent failure) are forgotten first;
//! if none is, new sources share one overflow bucket, so that many addresses cannot buy many
//! more attempts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Sources tracked at most.
pub(crate) const MAX_SOURCES: usize = 10_000;

/// The limit's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rate {
    /// Failures a source may make in a row.
    pub(crate) burst: u32,
    /// How long one token takes to come back.
    pub(crate) refill: Duration,
}

/// The default: 10 failures in a row, then one every 6 s (10 a minute).
pub(crate) const DEFAULT_RATE: Rate = Rate {
    burst: 10,
    refill: Duration::from_secs(6),
};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets by source.
#[derive(Debug)]
pub(crate) struct FailureLimiter {
    rate: Rate,
    buckets: HashMap<IpAddr, Bucket>,
    /// Shared by the sources that find the table full.
    overflow: Option<Bucket>,
}

/// The key of a source: its IPv4 address, or its IPv6 /64.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    /// Brings the tokens up to `now`.
    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at);
        let gained = elapsed.as_secs_f64() / rate.refill.as_secs_f64().max(1e-9);
        self.tokens = (self.tokens + gained).min(f64::from(rate.burst));
        self.at = now;
    }
}

impl FailureLimiter {
    pub(crate) fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: HashMap::new(),
            overflow: None,
        }
    }

    /// Whether `ip` may try to authenticate now (its bucket holds a token).
    pub(crate) fn allows(&mut self, ip: IpAddr, now: Instant) -> bool {
        let rate = self.rate;
        match self.bucket(ip, now) {
            Some(b) => {
                b.refill(rate, now);
                b.tokens >= 1.0
            }
            None => true,
        }
    }

    /// `ip` failed to authenticate: one token less.
    pub(crate) fn failed(&mut self, ip: IpAddr, now: Instant) {
        let rate = self.rate;
        let key = source(ip);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_SOURCES {
            self.prune(now);
        }
        let bucket = if self.buckets.len() < MAX_SOURCES || self.buckets.contains_key(&key) {
            self.buckets
                .entry(key)
                .or_insert_with(|| Bucket::full(rate, now))
        } else {
            self.overflow.get_or_insert_with(|| Bucket::full(rate, now))
        };
        bucket.refill(rate, now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }

    /// Sources tracked (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
    }

    /// The bucket `ip` counts against, if it has one.
    fn bucket(&mut self, ip: IpAddr, now: Instant) -> Option<&mut Bucket> {
        let key = source(ip);
        if self.buckets.contains_key(&key) {
            return self.buckets.get_mut(&key);
        }
        if self.buckets.len() >= MAX_SOURCES {
            self.prune(now);
            if self.buckets.len() >= MAX_SOURCES {
                return self.overflow.as_mut();
            }
        }
        None
    }

    /// Forgets the sources whose bucket is full again: they are as if never seen.
    fn prune(&mut self, now: Instant) {
        let rate = self.rate;
        self.buckets.retain(|_, b| {
            b.refill(rate, now);
            b.tokens < f64::from(rate.burst)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        burst: 3,
        refill: Duration::from_secs(10),
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_burst_then_one_attempt_per_refill() {
        let mut limiter = FailureLimiter::new(RATE);
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        for _ in 0..3 {
            assert!(limiter.allows(a, t0));
            limiter.failed(a, t0);
        }
        assert!(!limiter.allows(a, t0));
        assert!(!limiter.allows(a, t0 + Duration::from_secs(9)));
        // Another source is not concerned.
        assert!(limiter.allows(ip("10.0.0.2"), t0));
        let t1 = t0 + Duration::from_secs(10);
        assert!(limiter.allows(a, t1));
        limiter.failed(a, t1);
        assert!(!limiter.allows(a, t1));
        // Never more than the burst, however long it waited.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(limiter.allows(a, t2));
            limiter.failed(a, t2);
        }
        assert!(!limiter.allows(a, t2));
    }

    #[test]
    fn ipv6_sources_count_by_64_and_mapped_ipv4_as_ipv4() {
        let mut limiter = FailureLimiter::new(RATE);
        let t0 = Instant::now();
        for i in 1..=3 {
            limiter.failed(ip(&format!("2001:db8::{i}")), t0);
        }
        assert!(!limiter.allows(ip("2001:db8::ffff:1"), t0));
        assert!(limiter.allows(ip("2001:db8:0:1::1"), t0));
        for _ in 0..3 {
            limiter.failed(ip("::ffff:192.0.2.1"), t0);
        }
        assert!(!limiter.allows(ip("192.0.2.1"), t0));
    }

    #[test]
    fn the_table_stays_bounded_and_new_sources_share_the_overflow_bucket() {
        let mut limiter = FailureLimiter::new(RATE);
        let t0 = Instant::now();
        for i in 0..MAX_SOURCES as u32 {
            limiter.failed(IpAddr::V4(i.into()), t0);
        }
        assert_eq!(limiter.len(), MAX_SOURCES);
        // Nobody's bucket is full again yet: newcomers share one bucket.
        let newcomers: Vec<IpAddr> = (0..4u32)
            .map(|i| IpAddr::V4((u32::MAX - i).into()))
            .collect();
        for n in &newcomers[..3] {
            assert!(limiter.allows(*n, t0));
            limiter.failed(*n, t0);
        }
        assert!(!limiter.allows(newcomers[3], t0));
        assert_eq!(limiter.len(), MAX_SOURCES);
        // Once the old buckets refilled, they are forgotten and newcomers get their own.
        let later = t0 + Duration::from_secs(30);
        assert!(limiter.allows(newcomers[3], later));
        limiter.failed(newcomers[3], later);
        assert_eq!(limiter.len(), 1);
    }
}
