//! Retention: finished requests (with their history) and unacknowledged
//! channel messages older than their configured retention are deleted in
//! bounded batches, so the store does not grow forever. Not latency-sensitive: it runs
//! at start and then every tenth of the retention (at most hourly).

use std::sync::Arc;
use std::time::Duration;

use coatcheck_core::clock::add;

use crate::engine::Engine;
use crate::tasks::{run_service, BATCH};

fn before(now: coatcheck_core::Ts, keep: Duration) -> coatcheck_core::Ts {
    chrono::Duration::from_std(keep)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
}

/// Runs retention until shutdown.
pub async fn run(engine: Arc<Engine>) {
    run_service(
        engine,
        "retention",
        |e| &e.timers.retention,
        |e| async move {
            let shortest = e.config.channel_retention.min(e.config.request_retention);
            let every = (shortest / 10).min(Duration::from_secs(3600));
            Ok(Some(add(e.now(), every.max(Duration::from_millis(10)))))
        },
        |e| async move {
            let now = e.now();
            let messages = e
                .store
                .channel_purge(before(now, e.config.channel_retention), BATCH)
                .await?;
            let requests = e
                .store
                .request_purge(before(now, e.config.request_retention), BATCH)
                .await?;
            if messages + requests > 0 {
                tracing::info!(
                    requests,
                    messages,
                    "retention: deleted finished requests and unacknowledged channel messages"
                );
            }
            // A full batch of either runs the round again at once.
            Ok(messages.max(requests) as usize)
        },
    )
    .await
}
