//! Delayed-run promotion: a delayed or backed-off request needs no write to
//! become claimable — its `run_after` simply passes. This service sleeps
//! until the earliest future `run_after` and then wakes waiting claims, so a
//! `retry_after` of 0.3 s is claimable 0.3 s later, not at the next sweep.

use std::sync::Arc;

use crate::engine::Engine;
use crate::tasks::run_service;

/// Runs the scheduler until shutdown.
pub async fn run(engine: Arc<Engine>) {
    run_service(
        engine,
        "scheduler",
        |e| &e.timers.scheduler,
        |e| async move { Ok(e.store.due_times(e.now()).await?.run_after) },
        |e| async move {
            e.notifier.notify_all_queues();
            Ok(0)
        },
    )
    .await
}
