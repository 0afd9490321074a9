//! Time as a seam: every rule takes `now` as an argument, and the server asks
//! a [`Clock`] for it, so tests can drive leases, backoff and deadlines
//! without sleeping.

use std::sync::Mutex;
use std::time::Duration;

/// A point in time, UTC. Serialized as RFC 3339.
pub type Ts = chrono::DateTime<chrono::Utc>;

/// Where "now" comes from.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Ts;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Ts {
        truncate(chrono::Utc::now())
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Ts>,
}

impl ManualClock {
    /// A manual clock starting at the current wall-clock time.
    pub fn new() -> Self {
        Self::starting_at(chrono::Utc::now())
    }

    /// A manual clock starting at `at`.
    pub fn starting_at(at: Ts) -> Self {
        ManualClock {
            now: Mutex::new(truncate(at)),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = add(*now, by);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Ts {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drops sub-microsecond precision: stores keep microseconds, so every
/// time a rule computes is whole microseconds and reads back identical.
pub fn truncate(ts: Ts) -> Ts {
    from_micros(ts.timestamp_micros())
}

/// Adds a std duration (whole microseconds of it) to a timestamp,
/// saturating far in the future.
pub fn add(ts: Ts, d: Duration) -> Ts {
    let d = Duration::from_micros(d.as_micros().min(u64::MAX as u128) as u64);
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| ts.checked_add_signed(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// Microseconds since the Unix epoch: how stores keep timestamps.
pub fn to_micros(ts: Ts) -> i64 {
    ts.timestamp_micros()
}

/// The inverse of [`to_micros`].
pub fn from_micros(us: i64) -> Ts {
    chrono::DateTime::from_timestamp_micros(us).unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// Seconds from `now` until `then`, rounded up, at least 0 (for `Retry-After`).
pub fn seconds_until(now: Ts, then: Ts) -> u64 {
    let us = (then - now).num_microseconds().unwrap_or(i64::MAX);
    if us <= 0 {
        0
    } else {
        (us as u64).div_ceil(1_000_000)
    }
}
