//! Background services. They all share one shape ([`run_service`]): ask
//! "when is my next thing due?", sleep until then — or until a [`Timer`]
//! hint says something earlier is due, or the clock moved — do what is due
//! in bounded batches, repeat; stop on shutdown. Nothing polls on a period.
//!
//! - [`reaper`]: leases that ran out → requeue or dead-letter.
//! - [`expirer`]: deadlines that passed → `expired`.
//! - [`scheduler`]: delayed or backed-off requests becoming claimable, and
//!   unacknowledged channel messages becoming visible again → wake waiters.
//! - [`webhooks`]: reply deliveries due → POST them, signed; record each attempt.
//! - [`retention`]: unacknowledged channel messages past retention → delete.

pub mod expirer;
pub mod reaper;
pub mod retention;
pub mod scheduler;
pub mod webhooks;

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coatcheck_core::clock::to_micros;
use coatcheck_core::Ts;
use tokio::sync::Notify;

use crate::engine::Engine;

/// How many items one round handles before yielding.
pub const BATCH: u32 = 256;

/// A service's wake-up: the time it sleeps until, and a bell to ring when
/// something earlier became due.
#[derive(Debug)]
pub struct Timer {
    sleeping_until: AtomicI64,
    bell: Notify,
}

impl Default for Timer {
    fn default() -> Self {
        Timer {
            sleeping_until: AtomicI64::new(i64::MIN),
            bell: Notify::new(),
        }
    }
}

impl Timer {
    /// Something is due at `at`: wake the service if it sleeps past that.
    pub fn hint(&self, at: Ts) {
        if to_micros(at) < self.sleeping_until.load(Ordering::Acquire) {
            self.bell.notify_one();
        }
    }

    /// Wakes the service unconditionally.
    pub fn wake(&self) {
        self.bell.notify_one();
    }
}

/// The timers of the three services.
#[derive(Debug, Default)]
pub struct Timers {
    /// Lease expiry.
    pub reaper: Timer,
    /// Deadlines.
    pub expirer: Timer,
    /// Delayed runs and channel redeliveries.
    pub scheduler: Timer,
    /// Webhook deliveries.
    pub webhooks: Timer,
    /// Retention.
    pub retention: Timer,
}

impl Timers {
    /// Wakes every service.
    pub fn wake_all(&self) {
        self.reaper.wake();
        self.expirer.wake();
        self.scheduler.wake();
        self.webhooks.wake();
        self.retention.wake();
    }
}

/// The shared loop of every background service.
///
/// `due` answers the next due time (None: nothing due); `work` does what is
/// due now and answers how many items it handled (a full batch runs again at
/// once).
pub async fn run_service<D, DF, W, WF>(
    engine: Arc<Engine>,
    name: &'static str,
    timer: fn(&Engine) -> &Timer,
    due: D,
    work: W,
) where
    D: Fn(Arc<Engine>) -> DF,
    DF: Future<Output = coatcheck_store::Result<Option<Ts>>>,
    W: Fn(Arc<Engine>) -> WF,
    WF: Future<Output = coatcheck_store::Result<usize>>,
{
    let mut failures = 0u32;
    loop {
        if engine.shutdown.is_cancelled() {
            return;
        }
        let t = timer(&engine);
        // Mark "awake" first: while awake every hint rings the bell, and the
        // stored permit makes the sleep after this round end at once.
        t.sleeping_until.store(i64::MAX, Ordering::Release);
        let round = async {
            loop {
                let n = work(engine.clone()).await?;
                if n < BATCH as usize {
                    break;
                }
            }
            due(engine.clone()).await
        };
        let sleep_for = match round.await {
            Ok(next) => {
                failures = 0;
                let until = next.map(to_micros).unwrap_or(i64::MAX);
                t.sleeping_until.store(until, Ordering::Release);
                match next {
                    Some(next) => {
                        let now = engine.now();
                        let us = (next - now).num_microseconds().unwrap_or(i64::MAX).max(0);
                        // Due times are millisecond-precise at best; round up so we
                        // never wake a hair early and spin.
                        Duration::from_micros(us as u64 + 200)
                    }
                    None => Duration::from_secs(3600),
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(service = name, error = %e, "background round failed; retrying");
                Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)))
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep_for) => {}
            _ = t.bell.notified() => {}
            _ = engine.shutdown.cancelled() => return,
        }
    }
}
