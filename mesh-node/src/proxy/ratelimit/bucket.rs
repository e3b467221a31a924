//! A token bucket with Envoy's semantics (`envoy.extensions.common.ratelimit.v3` / local rate
//! limit): it starts full; every whole `fill_interval` since the last fill adds
//! `tokens_per_fill`, never above `max_tokens`; a connection or request takes one token.
//! Time is passed in, so the arithmetic is tested without sleeping.

use std::time::{Duration, Instant};

use crate::model::ratelimit::TokenBucketSpec;

/// The parameters of a bucket (a changed spec starts a new, full bucket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub max_tokens: u64,
    pub tokens_per_fill: u64,
    pub fill_interval: Duration,
}

impl Params {
    pub fn of(spec: &TokenBucketSpec) -> Self {
        Params {
            max_tokens: spec.max_tokens.max(1),
            tokens_per_fill: spec.tokens_per_fill().max(1),
            fill_interval: spec.interval(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TokenBucket {
    pub params: Params,
    tokens: u64,
    last_fill: Instant,
}

impl TokenBucket {
    pub fn new(params: Params, now: Instant) -> Self {
        TokenBucket {
            params,
            tokens: params.max_tokens,
            last_fill: now,
        }
    }

    /// Adds the fills due at `now`.
    pub fn refill(&mut self, now: Instant) {
        let interval = self.params.fill_interval.as_nanos().max(1);
        let fills = now.saturating_duration_since(self.last_fill).as_nanos() / interval;
        if fills == 0 {
            return;
        }
        let fills64 = u64::try_from(fills).unwrap_or(u64::MAX);
        self.tokens = self
            .tokens
            .saturating_add(fills64.saturating_mul(self.params.tokens_per_fill))
            .min(self.params.max_tokens);
        // Advance by whole intervals, so partial progress toward the next fill is kept.
        let step = u32::try_from(fills).map_or(None, |n| self.params.fill_interval.checked_mul(n));
        self.last_fill = match step {
            Some(d) => self.last_fill + d,
            None => now,
        };
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    pub fn is_full(&self) -> bool {
        self.tokens >= self.params.max_tokens
    }

    /// Takes one token (after [`Self::refill`]); false when empty.
    pub fn take(&mut self) -> bool {
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// How long until the next fill.
    pub fn next_fill_in(&self, now: Instant) -> Duration {
        self.params
            .fill_interval
            .saturating_sub(now.saturating_duration_since(self.last_fill))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(max: u64, per: u64, ms: u64) -> Params {
        Params {
            max_tokens: max,
            tokens_per_fill: per,
            fill_interval: Duration::from_millis(ms),
        }
    }

    #[test]
    fn starts_full_and_empties() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(params(3, 1, 1000), t0);
        assert!(b.is_full());
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
        assert_eq!(
            b.next_fill_in(t0 + Duration::from_millis(400)),
            Duration::from_millis(600)
        );
    }

    #[test]
    fn fills_by_whole_intervals_up_to_max() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(params(10, 2, 100), t0);
        for _ in 0..10 {
            assert!(b.take());
        }
        b.refill(t0 + Duration::from_millis(99));
        assert_eq!(b.tokens(), 0, "no fill before a whole interval");
        b.refill(t0 + Duration::from_millis(250));
        assert_eq!(b.tokens(), 4, "two fills of two");
        // The half interval already waited counts toward the next fill.
        b.refill(t0 + Duration::from_millis(300));
        assert_eq!(b.tokens(), 6);
        b.refill(t0 + Duration::from_secs(3600));
        assert_eq!(b.tokens(), 10, "never above max");
        assert!(b.is_full());
    }

    #[test]
    fn rate_over_a_simulated_second() {
        // 5 per 100 ms, max 5: over 1 s of constant demand, 5 + 10 * 5 = 55 pass.
        let t0 = Instant::now();
        let mut b = TokenBucket::new(params(5, 5, 100), t0);
        let mut passed = 0;
        for ms in 0..=1000u64 {
            let now = t0 + Duration::from_millis(ms);
            b.refill(now);
            while b.take() {
                passed += 1;
            }
        }
        assert_eq!(passed, 55);
    }
}
