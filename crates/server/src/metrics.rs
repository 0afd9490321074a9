//! Prometheus metrics, kept in memory and rendered as text at `/metrics`.
//! Small on purpose: counters by queue, a few latency histograms, and the
//! per-queue claim rate shown by `/v1/queues`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use coatcheck_core::{Status, Ts};
use coatcheck_store::QueueCounts;

/// Histogram bucket upper bounds, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{b}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// The counters this server keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Counter {
    /// Requests submitted (new, not replays).
    Submitted,
    /// Requests claimed.
    Claimed,
    /// Requests completed.
    Completed,
    /// Attempts failed (retried or dead-lettered).
    Failed,
    /// Requests dead-lettered.
    DeadLettered,
    /// Leases that ran out.
    LeasesExpired,
    /// Requests expired by their deadline.
    Expired,
    /// Requests cancelled.
    Cancelled,
    /// Times a claim looked at the store for work (a claim that waits for
    /// wake-ups: its first look and one per wake-up; a claim parked in the
    /// store is handed work instead). Far above the requests claimed means
    /// claims are woken for nothing.
    ClaimLooks,
}

impl Counter {
    fn name(self) -> &'static str {
        match self {
            Counter::Submitted => "coatcheck_submitted_total",
            Counter::Claimed => "coatcheck_claimed_total",
            Counter::Completed => "coatcheck_completed_total",
            Counter::Failed => "coatcheck_attempts_failed_total",
            Counter::DeadLettered => "coatcheck_dead_lettered_total",
            Counter::LeasesExpired => "coatcheck_leases_expired_total",
            Counter::Expired => "coatcheck_expired_total",
            Counter::Cancelled => "coatcheck_cancelled_total",
            Counter::ClaimLooks => "coatcheck_claim_looks_total",
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    counters: BTreeMap<(Counter, String), u64>,
    http: BTreeMap<(String, String, u16), Histogram>,
    e2e: BTreeMap<String, Histogram>,
    claim_window: BTreeMap<String, [(i64, u64); 60]>,
    refused: BTreeMap<&'static str, u64>,
}

/// The metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `n` to a counter of a queue.
    pub fn add(&self, c: Counter, queue: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut inner = self.lock();
        *inner.counters.entry((c, queue.to_string())).or_default() += n;
    }

    /// Records `n` claims on `queue` at `now` (for the claim rate).
    pub fn claimed(&self, queue: &str, n: u64, now: Ts) {
        self.add(Counter::Claimed, queue, n);
        let sec = now.timestamp();
        let mut inner = self.lock();
        let window = inner
            .claim_window
            .entry(queue.to_string())
            .or_insert([(0, 0); 60]);
        let slot = &mut window[sec.rem_euclid(60) as usize];
        if slot.0 != sec {
            *slot = (sec, 0);
        }
        slot.1 += n;
    }

    /// Counts a call refused by a limit (`queue_depth`, `submit_rate`, `streams`, …).
    pub fn refused(&self, reason: &'static str) {
        *self.lock().refused.entry(reason).or_default() += 1;
    }

    /// Claims per second on `queue` over the last minute.
    pub fn claim_rate(&self, queue: &str, now: Ts) -> f64 {
        let sec = now.timestamp();
        let inner = self.lock();
        let Some(window) = inner.claim_window.get(queue) else {
            return 0.0;
        };
        let n: u64 = window
            .iter()
            .filter(|(s, _)| sec - *s < 60 && *s <= sec)
            .map(|(_, n)| n)
            .sum();
        n as f64 / 60.0
    }

    /// Records a finished request's time from submit to terminal.
    pub fn finished(&self, queue: &str, created: Ts, finished: Ts) {
        let secs = (finished - created).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
        self.lock()
            .e2e
            .entry(queue.to_string())
            .or_default()
            .observe(secs);
    }

    /// Records one HTTP call.
    pub fn http(&self, method: &str, route: &str, status: u16, took: Duration) {
        let mut inner = self.lock();
        inner
            .http
            .entry((method.to_string(), route.to_string(), status))
            .or_default()
            .observe(took.as_secs_f64());
    }

    /// Renders everything in the Prometheus text format, with the current
    /// counts by queue and status from the store.
    pub fn render(&self, queues: &[QueueCounts], flushes: Option<u64>) -> String {
        let mut out = String::with_capacity(4096);
        if let Some(n) = flushes {
            out.push_str(
                "# HELP coatcheck_store_flushes_total fsyncs the embedded store made to make commits durable.\n",
            );
            out.push_str("# TYPE coatcheck_store_flushes_total counter\n");
            let _ = writeln!(out, "coatcheck_store_flushes_total {n}");
        }
        out.push_str("# HELP coatcheck_requests Requests by queue and status.\n");
        out.push_str("# TYPE coatcheck_requests gauge\n");
        for q in queues {
            for st in Status::ALL {
                let n = q
                    .counts
                    .iter()
                    .find(|(s, _)| *s == st)
                    .map(|(_, n)| *n)
                    .unwrap_or(0);
                let _ = writeln!(
                    out,
                    "coatcheck_requests{{queue=\"{}\",status=\"{st}\"}} {n}",
                    escape(&q.queue)
                );
            }
        }
        let inner = self.lock();
        let mut last = None;
        for ((c, queue), n) in &inner.counters {
            if last != Some(*c) {
                let _ = writeln!(out, "# TYPE {} counter", c.name());
                last = Some(*c);
            }
            let _ = writeln!(out, "{}{{queue=\"{}\"}} {n}", c.name(), escape(queue));
        }
        out.push_str("# HELP coatcheck_refused_total Calls refused by a limit, by reason.\n");
        out.push_str("# TYPE coatcheck_refused_total counter\n");
        for (reason, n) in &inner.refused {
            let _ = writeln!(out, "coatcheck_refused_total{{reason=\"{reason}\"}} {n}");
        }
        out.push_str("# HELP coatcheck_request_duration_seconds Submit to terminal, by queue.\n");
        out.push_str("# TYPE coatcheck_request_duration_seconds histogram\n");
        for (queue, h) in &inner.e2e {
            h.render(
                &mut out,
                "coatcheck_request_duration_seconds",
                &format!("queue=\"{}\"", escape(queue)),
            );
        }
        out.push_str(
            "# HELP coatcheck_http_request_duration_seconds HTTP calls by route and status.\n",
        );
        out.push_str("# TYPE coatcheck_http_request_duration_seconds histogram\n");
        for ((method, route, status), h) in &inner.http {
            let labels = format!(
                "method=\"{method}\",route=\"{}\",status=\"{status}\"",
                escape(route)
            );
            h.render(&mut out, "coatcheck_http_request_duration_seconds", &labels);
        }
        out
    }
}
