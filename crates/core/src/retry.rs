//! Retry backoff: exponential with jitter, capped.

use std::time::Duration;

/// How long a failed attempt waits before it may run again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// The delay after the first failed attempt (before jitter).
    pub base: Duration,
    /// Each further attempt multiplies the delay by this.
    pub factor: f64,
    /// The delay never exceeds this.
    pub max: Duration,
    /// The fraction of the delay that is random: 0 = none, 0.5 = "equal jitter"
    /// (the delay is between half and all of the exponential value).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(300),
            jitter: 0.5,
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt number `attempt` (1-based), given a
    /// random number `r` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, r: f64) -> Duration {
        let exp = self
            .factor
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let full = (self.base.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let r = if r.is_finite() {
            r.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Duration::from_secs_f64(full * (1.0 - jitter) + full * jitter * r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..Default::default()
        };
        assert_eq!(p.delay(1, 0.7), Duration::from_secs(1));
        assert_eq!(p.delay(2, 0.7), Duration::from_secs(2));
        assert_eq!(p.delay(4, 0.7), Duration::from_secs(8));
        assert_eq!(p.delay(30, 0.7), Duration::from_secs(300));
        assert_eq!(p.delay(u32::MAX, 0.7), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let p = RetryPolicy::default();
        for i in 0..100 {
            let r = i as f64 / 100.0;
            let d = p.delay(3, r).as_secs_f64();
            assert!((2.0..=4.0).contains(&d), "{d}");
        }
        assert!(p.delay(3, 0.0) < p.delay(3, 0.99));
    }
}
