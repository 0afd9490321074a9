//! Retention: unacknowledged channel messages older than the configured
//! retention are deleted in bounded batches. Not latency-sensitive: it runs
//! at start and then every tenth of the retention (at most hourly).

use std::sync::Arc;
use std::time::Duration;

use coatcheck_core::clock::add;

use crate::engine::Engine;
use crate::tasks::{run_service, BATCH};

/// Runs retention until shutdown.
pub async fn run(engine: Arc<Engine>) {
    run_service(
        engine,
        "retention",
        |e| &e.timers.retention,
        |e| async move {
            let every = (e.config.channel_retention / 10).min(Duration::from_secs(3600));
            Ok(Some(add(e.now(), every.max(Duration::from_millis(10)))))
        },
        |e| async move {
            let retention = chrono::Duration::from_std(e.config.channel_retention)
                .unwrap_or(chrono::Duration::MAX);
            let before = e
                .now()
                .checked_sub_signed(retention)
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
            let n = e.store.channel_purge(before, BATCH).await?;
            if n > 0 {
                tracing::info!(
                    deleted = n,
                    "retention: deleted unacknowledged channel messages"
                );
            }
            Ok(n as usize)
        },
    )
    .await
}
