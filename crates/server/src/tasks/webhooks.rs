//! The webhook dispatcher: sleeps until the next delivery is due, takes the
//! due ones under a lease (so another node does not attempt them
//! meanwhile, and a node that dies mid-attempt is retried after the lease),
//! attempts them concurrently, and records each attempt in the delivery and
//! in the request's history. Failures are retried on the configured
//! schedule with ±10 % jitter; a 410 Gone or an exhausted schedule ends the
//! delivery as failed. Deliveries live in the store, so they survive restarts.

use std::sync::Arc;
use std::time::Duration;

use coatcheck_core::clock::add;
use coatcheck_store::WebhookOutcome;

use crate::engine::Engine;
use crate::tasks::run_service;
use crate::webhook;

/// Deliveries attempted at once.
const PARALLEL: u32 = 32;

/// Runs the dispatcher until shutdown.
pub async fn run(engine: Arc<Engine>) {
    run_service(
        engine,
        "webhooks",
        |e| &e.timers.webhooks,
        |e| async move { Ok(e.store.due_times(e.now()).await?.webhook) },
        |e| async move { dispatch(&e).await },
    )
    .await
}

async fn dispatch(e: &Arc<Engine>) -> coatcheck_store::Result<usize> {
    let now = e.now();
    let lease = e.config.webhook_timeout + Duration::from_secs(10);
    let due = e.store.webhook_claim_due(now, PARALLEL, lease).await?;
    let n = due.len();
    let mut set = tokio::task::JoinSet::new();
    for d in due {
        let e = e.clone();
        set.spawn(async move {
            let cfg = &e.config;
            let a = webhook::attempt(
                &d.url,
                &d.message_id,
                &d.body,
                &cfg.webhook_secrets,
                cfg.webhook_timeout,
                cfg.webhook_allow_private,
                e.now().timestamp(),
            )
            .await;
            let now = e.now();
            let next_attempt_at = if a.delivered || a.permanent {
                None
            } else {
                cfg.webhook_schedule.get(d.attempt as usize - 1).map(|delay| {
                    let jitter = 0.9 + rand::random::<f64>() * 0.2;
                    add(now, delay.mul_f64(jitter))
                })
            };
            if !a.delivered {
                tracing::info!(message_id = %d.message_id, attempt = d.attempt, error = %a.message, "webhook attempt failed");
            }
            let outcome = WebhookOutcome {
                message_id: d.message_id.clone(),
                attempt: d.attempt,
                delivered: a.delivered,
                http_status: a.http_status,
                message: a.message,
                next_attempt_at,
                now,
            };
            if let Err(err) = e.store.webhook_record(outcome).await {
                tracing::warn!(error = %err, "recording a webhook attempt failed; it will be retried after its lease");
            }
            e.notifier.notify(&crate::notify::Key::Request(d.request_id));
            if let Some(t) = next_attempt_at {
                e.timers.webhooks.hint(t);
            }
        });
    }
    while set.join_next().await.is_some() {}
    Ok(if n as u32 >= PARALLEL {
        crate::tasks::BATCH as usize
    } else {
        n
    })
}
