//! The lease reaper: sleeps until the earliest lease expiry, then requeues
//! (attempts left), dead-letters (none left) or cancels (cancel requested)
//! every running request whose lease ran out. The old lease token is fenced
//! from then on.

use std::sync::Arc;

use crate::engine::Engine;
use crate::tasks::{run_service, BATCH};

/// Runs the reaper until shutdown.
pub async fn run(engine: Arc<Engine>) {
    run_service(
        engine,
        "reaper",
        |e| &e.timers.reaper,
        |e| async move { Ok(e.store.due_times(e.now()).await?.lease_expiry) },
        |e| async move { e.expire_leases(BATCH).await },
    )
    .await
}
