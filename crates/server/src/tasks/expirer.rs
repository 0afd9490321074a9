//! The deadline expirer: sleeps until the earliest deadline of an unfinished
//! request, then moves every request past its deadline to `expired`.

use std::sync::Arc;

use crate::engine::Engine;
use crate::tasks::{run_service, BATCH};

/// Runs the expirer until shutdown.
pub async fn run(engine: Arc<Engine>) {
    run_service(
        engine,
        "expirer",
        |e| &e.timers.expirer,
        |e| async move { Ok(e.store.due_times(e.now()).await?.deadline) },
        |e| async move { e.expire_deadlines(BATCH).await },
    )
    .await
}
