//! Delayed-run promotion: a delayed or backed-off request needs no write to
//! become claimable — its `run_after` simply passes. This service sleeps
//! until the earliest future `run_after` and then wakes waiting claims, so a
//! `retry_after` of 0.3 s is claimable 0.3 s later, not at the next sweep.
//! Likewise a received channel message whose visibility runs out wakes the
//! channel's waiting receivers at that moment.

use std::sync::Arc;

use crate::engine::Engine;
use crate::tasks::run_service;

/// Runs the scheduler until shutdown.
pub async fn run(engine: Arc<Engine>) {
    run_service(
        engine,
        "scheduler",
        |e| &e.timers.scheduler,
        |e| async move {
            let due = e.store.due_times(e.now()).await?;
            Ok([due.run_after, due.channel_visible]
                .into_iter()
                .flatten()
                .min())
        },
        |e| async move {
            e.notifier.notify_all_queues();
            e.notifier.notify_all_channels();
            Ok(0)
        },
    )
    .await
}
