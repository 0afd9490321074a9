//! Backoff math and `Retry-After` parsing, shared by the transport retries and
//! the worker runtime.
//!
//! Key decisions:
//! - Exponential backoff with "equal jitter": the n-th retry waits between half
//!   and all of `min(max, base · 2ⁿ)`. Half keeps a floor so retries never
//!   stampede back at once; the random half spreads many clients apart.
//! - The delay is a pure function of the attempt and a random number in
//!   `[0, 1)`, so the math is tested without sleeping or seeding.
//! - `Retry-After` is honoured only as integer delta-seconds (API.md says the
//!   server always sends that form); anything else falls back to backoff.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};

/// Longest `Retry-After` the transport waits out by itself. A server asking
/// for more gets its answer handed to the caller instead of a retry that is
/// earlier than asked or a call that hangs for minutes.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// An exponential backoff schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// The ceiling of the first retry's delay.
    pub base: Duration,
    /// No delay exceeds this.
    pub max: Duration,
}

impl Backoff {
    /// Transport retries of one call: 100 ms, 200 ms, … up to 5 s.
    pub const TRANSPORT: Backoff = Backoff {
        base: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };

    /// The worker's reconnect loop: 200 ms, 400 ms, … up to 10 s.
    pub const WORKER: Backoff = Backoff {
        base: Duration::from_millis(200),
        max: Duration::from_secs(10),
    };

    /// The delay before retry number `attempt` (0-based) given a random `r`
    /// in `[0, 1)`: between half and all of `min(max, base · 2^attempt)`.
    pub fn delay(&self, attempt: u32, r: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let r = if r.is_finite() {
            r.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let half = ceiling / 2;
        half + half.mul_f64(r)
    }

    /// [`Backoff::delay`] with a fresh random number.
    pub fn jittered(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

/// The `Retry-After` header as integer delta-seconds, if present in that form.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    value.parse::<u64>().ok().map(Duration::from_secs)
}

/// Seconds as the API writes them (JSON numbers and query strings), rounded
/// to milliseconds so that query strings stay short.
pub(crate) fn secs(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn grows_exponentially_within_bounds() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(200));
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(600));
        // Capped at max, with the floor at half of it.
        assert_eq!(b.delay(10, 0.0), Duration::from_millis(2500));
        assert_eq!(b.delay(10, 1.0), Duration::from_secs(5));
        // Huge attempt numbers neither overflow nor exceed the cap.
        assert_eq!(b.delay(u32::MAX, 1.0), Duration::from_secs(5));
        // Nonsense randomness is clamped.
        assert_eq!(b.delay(0, f64::NAN), Duration::from_millis(50));
        assert_eq!(b.delay(0, 7.0), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_in_range() {
        for attempt in 0..12 {
            let d = Backoff::WORKER.jittered(attempt);
            let ceiling = Backoff::WORKER.delay(attempt, 1.0);
            assert!(d >= ceiling / 2 && d <= ceiling, "{attempt}: {d:?}");
        }
    }

    #[test]
    fn parses_retry_after_seconds_only() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(RETRY_AFTER, HeaderValue::from_static(" 0 "));
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("-1"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn seconds_are_rounded_to_millis() {
        assert_eq!(secs(Duration::from_millis(300)), 0.3);
        assert_eq!(secs(Duration::from_micros(1_234_567)), 1.234);
        assert_eq!(secs(Duration::from_secs(50)), 50.0);
    }
}
