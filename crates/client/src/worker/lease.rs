//! Keeping one claimed request's lease alive: a heartbeat task per job that
//! renews the lease at about a third of its length, carries progress, and
//! turns the server's `cancel_requested` (or a refused heartbeat) into the
//! job's cancellation token.
//!
//! Key decisions:
//! - A third of the lease leaves two more chances before it runs out when a
//!   heartbeat fails; a failed heartbeat is retried sooner (backoff, at most
//!   half the interval) rather than waiting a full interval.
//! - Progress wakes the task early but is rate-limited to one send per
//!   250 ms; a value that could not be sent is put back unless a newer one
//!   arrived meanwhile.
//! - A heartbeat refused with 409/404 means the lease is gone (expired and
//!   re-claimed, or the request is terminal): the job's token fires and its
//!   outcome will not be reported.
//! - The heartbeat runs in its own task, so a handler that blocks its thread
//!   for a while still keeps its lease.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use coatcheck_core::wire::HeartbeatBody;
use tokio::time::Instant;

use super::job::JobShared;
use super::{Ctx, WorkerEvent};
use crate::backoff::Backoff;

/// Minimum gap between two heartbeats sent for progress.
const PROGRESS_GAP: Duration = Duration::from_millis(250);

/// The heartbeat interval for a lease.
pub(crate) fn interval(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(50))
}

/// Heartbeats `shared`'s lease until aborted or the lease is refused.
pub(crate) async fn heartbeat_loop(ctx: Arc<Ctx>, shared: Arc<JobShared>) {
    let every = interval(ctx.lease);
    let mut next = Instant::now() + every;
    let mut last_sent: Option<Instant> = None;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.progress_wake.notified() => {
                if let Some(at) = last_sent {
                    tokio::time::sleep_until((at + PROGRESS_GAP).min(next)).await;
                }
            }
        }
        let progress = shared.progress.lock().ok().and_then(|mut slot| slot.take());
        last_sent = Some(Instant::now());
        let body = HeartbeatBody {
            lease_token: shared.lease_token.clone(),
            progress: progress.clone(),
            extend: None,
        };
        match ctx.client.heartbeat(&shared.id, body).await {
            Ok(answer) => {
                failures = 0;
                next = Instant::now() + every;
                if answer.cancel_requested {
                    shared.cancel.cancel();
                }
            }
            Err(e) if e.is_conflict() || e.is_not_found() => {
                if !shared.finished.load(Ordering::Acquire) {
                    shared.lost.store(true, Ordering::Release);
                    shared.cancel.cancel();
                    ctx.emit(WorkerEvent::LeaseLost {
                        id: shared.id.clone(),
                    });
                }
                return;
            }
            Err(error) => {
                if let (Some(p), Ok(mut slot)) = (progress, shared.progress.lock()) {
                    if slot.is_none() {
                        *slot = Some(p);
                    }
                }
                next = Instant::now() + Backoff::WORKER.jittered(failures).min(every / 2);
                failures = failures.saturating_add(1);
                ctx.emit(WorkerEvent::HeartbeatFailed {
                    id: shared.id.clone(),
                    error,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_at_a_third_of_the_lease() {
        assert_eq!(interval(Duration::from_secs(30)), Duration::from_secs(10));
        assert_eq!(
            interval(Duration::from_secs(1)),
            Duration::from_nanos(333_333_333)
        );
        assert_eq!(
            interval(Duration::from_millis(30)),
            Duration::from_millis(50)
        );
    }
}
