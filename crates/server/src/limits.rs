//! Limits that keep one client from hurting the others: queue depth, a
//! per-tenant submit rate (token bucket), and open long-polls/streams per
//! key. All refusals are `429` problem documents with `Retry-After`, and are
//! counted in `/metrics` (`coatcheck_refused_total{reason}`).
//!
//! Rate and stream limits are per node: with N nodes behind a balancer a
//! tenant may submit up to N times the rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Limits as configured.
#[derive(Debug, Clone, Default)]
pub struct LimitsConfig {
    /// Queued requests a queue may hold (`None`: unlimited).
    pub max_queue_depth: Option<u64>,
    /// Per-queue overrides of `max_queue_depth`.
    pub queue_depth: HashMap<String, u64>,
    /// Submits per second per tenant (`None`: unlimited).
    pub submit_rate: Option<f64>,
    /// The bucket size of the submit rate (default: one second's worth, at least 1).
    pub submit_burst: Option<f64>,
    /// Long-polls and streams one key (or, without keys, one tenant) may hold open.
    pub max_streams_per_key: usize,
}

impl LimitsConfig {
    /// No limits but a generous stream cap.
    pub fn new() -> Self {
        LimitsConfig {
            max_streams_per_key: 1000,
            ..Default::default()
        }
    }

    /// The depth limit of a queue.
    pub fn depth_limit(&self, queue: &str) -> Option<u64> {
        self.queue_depth
            .get(queue)
            .copied()
            .or(self.max_queue_depth)
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The live state of the limits.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<String, Bucket>>,
    streams: Arc<Mutex<HashMap<String, usize>>>,
    depths: Mutex<HashMap<String, (u64, Instant)>>,
}

/// An open long-poll or stream; the slot frees when it drops.
#[derive(Debug)]
pub struct StreamPermit {
    key: String,
    streams: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut m = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// How long depth counts are reused before the store is asked again.
pub const DEPTH_CACHE: Duration = Duration::from_millis(100);

impl Limiter {
    /// Takes one submit token of `tenant`; `Err(wait)` says when one is due.
    pub fn take_submit(&self, cfg: &LimitsConfig, tenant: &str) -> Result<(), Duration> {
        let Some(rate) = cfg.submit_rate.filter(|r| *r > 0.0) else {
            return Ok(());
        };
        let burst = cfg.submit_burst.unwrap_or(rate).max(1.0);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.entry(tenant.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }

    /// Opens a stream slot for `key`, or `None` at the cap.
    pub fn open_stream(&self, cfg: &LimitsConfig, key: &str) -> Option<StreamPermit> {
        let mut m = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key.to_string()).or_insert(0);
        if *n >= cfg.max_streams_per_key {
            return None;
        }
        *n += 1;
        Some(StreamPermit {
            key: key.to_string(),
            streams: self.streams.clone(),
        })
    }

    /// A recent depth of `queue`, if one is cached.
    pub fn cached_depth(&self, queue: &str) -> Option<u64> {
        let m = self.depths.lock().unwrap_or_else(|e| e.into_inner());
        m.get(queue)
            .filter(|(_, at)| at.elapsed() < DEPTH_CACHE)
            .map(|(n, _)| *n)
    }

    /// Remembers the depth of `queue`; counts a submit that was let in.
    pub fn note_depth(&self, queue: &str, depth: u64) {
        self.depths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(queue.to_string(), (depth, Instant::now()));
    }

    /// Counts one more request in a cached depth.
    pub fn bump_depth(&self, queue: &str) {
        if let Some((n, _)) = self
            .depths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(queue)
        {
            *n += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let cfg = LimitsConfig {
            submit_rate: Some(10.0),
            submit_burst: Some(3.0),
            ..LimitsConfig::new()
        };
        let l = Limiter::default();
        for _ in 0..3 {
            assert!(l.take_submit(&cfg, "t").is_ok());
        }
        let wait = l.take_submit(&cfg, "t").unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(
            l.take_submit(&cfg, "other").is_ok(),
            "tenants have their own buckets"
        );
    }

    #[test]
    fn stream_slots_free_on_drop() {
        let cfg = LimitsConfig {
            max_streams_per_key: 2,
            ..LimitsConfig::new()
        };
        let l = Limiter::default();
        let a = l.open_stream(&cfg, "k").unwrap();
        let _b = l.open_stream(&cfg, "k").unwrap();
        assert!(l.open_stream(&cfg, "k").is_none());
        drop(a);
        assert!(l.open_stream(&cfg, "k").is_some());
    }
}
