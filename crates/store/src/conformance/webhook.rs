//! Webhook deliveries: a terminal transition of a request with a webhook
//! return address creates a delivery in the same write; the dispatcher
//! takes due deliveries under a lease and records each attempt, in the
//! delivery and in the request's history.

use std::time::Duration;

use coatcheck_core::clock::to_micros;
use coatcheck_core::wire::ReplyMessage;
use coatcheck_core::{EventKind, ReplyTo, Request, Status, Ts, WebhookTarget};

use super::new_request;
use super::support::*;
use crate::{Store, WebhookDelivery, WebhookOutcome};

/// The target most cases deliver to (never contacted: stores only record).
const URL: &str = "https://hooks.example.com/coatcheck?x=1";

fn hook() -> ReplyTo {
    ReplyTo::Webhook(WebhookTarget { url: URL.into() })
}

/// A default submission to `queue` replying to [`URL`].
fn hooked(queue: &str) -> coatcheck_core::rules::NewRequest {
    let mut new = new_request(queue);
    new.reply_to = Some(hook());
    new.correlation_id = Some("corr-hook".into());
    new
}

/// Submits, claims and completes a request replying to [`URL`] at `now`.
async fn completed(store: &dyn Store, queue: &str, now: Ts) -> Request {
    let req = submit(store, hooked(queue), now).await;
    let c = claim_one(store, queue, now).await;
    let changed = settle(store, &req.id, &token(&c), completion(r#"{"v":1}"#), now)
        .await
        .expect("complete");
    assert_eq!(changed.reply, Some(hook()), "the change's reply");
    changed.request
}

async fn claim_due(store: &dyn Store, now: Ts, lease: Duration) -> Vec<WebhookDelivery> {
    store
        .webhook_claim_due(now, 10, lease)
        .await
        .expect("webhook_claim_due")
}

/// An attempt's outcome.
fn outcome(
    d: &WebhookDelivery,
    delivered: bool,
    http_status: Option<u16>,
    next: Option<Ts>,
    now: Ts,
) -> WebhookOutcome {
    WebhookOutcome {
        message_id: d.message_id.clone(),
        attempt: d.attempt,
        delivered,
        http_status,
        message: if delivered {
            String::new()
        } else {
            format!("the receiver answered {http_status:?}")
        },
        next_attempt_at: next,
        now,
    }
}

/// The last history event of a request.
async fn last_event(store: &dyn Store, id: &str) -> EventKind {
    history(store, id).await.pop().expect("events").kind
}

/// Completing creates one delivery in the same write (the history shows no
/// delivery yet); it is due at once, carries the reply message as its body,
/// and is leased when taken: not taken again until the lease passes.
pub async fn webhook_reply_creates_a_delivery_taken_under_a_lease(store: &dyn Store) {
    let t0 = base();
    let req = completed(store, "q-hook", t0).await;
    assert_eq!(
        kinds(store, &req.id).await,
        ["submitted", "claimed", "succeeded"]
    );
    assert_eq!(
        store.due_times(t0).await.expect("due").webhook,
        Some(t0),
        "due at once"
    );

    let t1 = at(t0, 500);
    let got = claim_due(store, t1, secs(30)).await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(
        (d.request_id.as_str(), d.url.as_str()),
        (req.id.as_str(), URL)
    );
    assert_eq!((d.attempt, d.created_at), (1, t0));
    let body: ReplyMessage = serde_json::from_str(&d.body).expect("the body is a reply message");
    assert_eq!(body.message_id, d.message_id);
    assert_eq!(
        (body.request_id.as_str(), body.queue.as_str()),
        (req.id.as_str(), "q-hook")
    );
    assert_eq!(body.correlation_id.as_deref(), Some("corr-hook"));
    assert_eq!(body.status, Status::Succeeded);
    assert_eq!(body.output.as_ref().map(|o| o.get()), Some(r#"{"v":1}"#));
    assert!(body.error.is_none());
    assert_eq!(
        body.finished_at.map(to_micros),
        req.finished_at.map(to_micros)
    );

    assert!(claim_due(store, t1, secs(30)).await.is_empty(), "leased");
    assert!(
        claim_due(store, at(t1, 29_999), secs(30)).await.is_empty(),
        "still leased"
    );
    let due = store.due_times(t1).await.expect("due");
    assert_eq!(
        due.webhook,
        Some(at(t1, 30_000)),
        "due again when the lease passes"
    );
    // The taker died: after the lease the same attempt is made again.
    let again = claim_due(store, at(t1, 30_000), secs(30)).await;
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].message_id.as_str(), again[0].attempt),
        (d.message_id.as_str(), 1)
    );
    assert_unchanged(store, &req, "taking deliveries").await;
}

/// A failed attempt with a next time records `reply_delivery_failed` (HTTP
/// status, next attempt) and makes the delivery due then, as attempt 2; a
/// delivered attempt records `reply_delivered` and ends the delivery.
/// Recording changes nothing of the request but its history.
pub async fn webhook_record_retries_then_delivers(store: &dyn Store) {
    let t0 = base();
    let req = completed(store, "q-retry", t0).await;
    let d = claim_due(store, t0, secs(30)).await.remove(0);
    let t1 = at(t0, 100);
    let next = at(t1, 5_000);
    store
        .webhook_record(outcome(&d, false, Some(500), Some(next), t1))
        .await
        .expect("record");
    match last_event(store, &req.id).await {
        EventKind::ReplyDeliveryFailed {
            target,
            attempt,
            http_status,
            message,
            next_attempt_at,
        } => {
            assert_eq!(
                (target.as_str(), attempt, http_status),
                ("webhook", 1, Some(500))
            );
            assert!(!message.is_empty());
            assert_eq!(next_attempt_at, Some(next));
        }
        other => panic!("expected reply_delivery_failed, got {other:?}"),
    }
    let after = get(store, &req.id).await;
    assert_eq!(after.history_seq, req.history_seq + 1);
    assert_eq!(
        (after.status, after.updated_at),
        (req.status, req.updated_at)
    );
    assert_eq!(store.due_times(t1).await.expect("due").webhook, Some(next));
    assert!(
        claim_due(store, at(t1, 4_999), secs(30)).await.is_empty(),
        "not before"
    );

    let d2 = claim_due(store, next, secs(30)).await.remove(0);
    assert_eq!(
        (d2.message_id.as_str(), d2.attempt),
        (d.message_id.as_str(), 2)
    );
    assert_eq!(d2.body, d.body, "the same body every attempt");
    let t2 = at(next, 50);
    store
        .webhook_record(outcome(&d2, true, Some(204), None, t2))
        .await
        .expect("record");
    match last_event(store, &req.id).await {
        EventKind::ReplyDelivered {
            target,
            attempt,
            http_status,
        } => assert_eq!(
            (target.as_str(), attempt, http_status),
            ("webhook", 2, Some(204))
        ),
        other => panic!("expected reply_delivered, got {other:?}"),
    }
    assert_eq!(
        kinds(store, &req.id).await,
        [
            "submitted",
            "claimed",
            "succeeded",
            "reply_delivery_failed",
            "reply_delivered"
        ]
    );
    assert_eq!(store.due_times(t2).await.expect("due").webhook, None);
    assert!(
        claim_due(store, at(t2, 86_400_000), secs(30))
            .await
            .is_empty(),
        "delivered"
    );

    // A late duplicate record of a settled delivery changes nothing.
    let before = get(store, &req.id).await;
    store
        .webhook_record(outcome(
            &d2,
            false,
            Some(500),
            Some(at(t2, 1_000)),
            at(t2, 10),
        ))
        .await
        .expect("a duplicate record");
    assert_unchanged(store, &before, "a duplicate record").await;
    assert!(claim_due(store, at(t2, 86_400_000), secs(30))
        .await
        .is_empty());
}

/// A failed attempt without a next time (410 Gone, schedule exhausted)
/// ends the delivery as failed for good.
pub async fn webhook_record_without_next_attempt_fails_for_good(store: &dyn Store) {
    let t0 = base();
    let req = completed(store, "q-gone", t0).await;
    let d = claim_due(store, t0, secs(30)).await.remove(0);
    let t1 = at(t0, 100);
    store
        .webhook_record(outcome(&d, false, Some(410), None, t1))
        .await
        .expect("record");
    match last_event(store, &req.id).await {
        EventKind::ReplyDeliveryFailed {
            attempt,
            http_status,
            next_attempt_at,
            ..
        } => assert_eq!(
            (attempt, http_status, next_attempt_at),
            (1, Some(410), None)
        ),
        other => panic!("expected reply_delivery_failed, got {other:?}"),
    }
    assert_eq!(store.due_times(t1).await.expect("due").webhook, None);
    assert!(claim_due(store, at(t1, 86_400_000), secs(30))
        .await
        .is_empty());
    // A failure without an HTTP answer (timeout, refused) has no status.
    let other = completed(store, "q-timeout", t1).await;
    let d = claim_due(store, t1, secs(30)).await.remove(0);
    assert_eq!(d.request_id, other.id);
    store
        .webhook_record(outcome(&d, false, None, None, at(t1, 10)))
        .await
        .expect("record");
    match last_event(store, &other.id).await {
        EventKind::ReplyDeliveryFailed { http_status, .. } => assert_eq!(http_status, None),
        k => panic!("expected reply_delivery_failed, got {k:?}"),
    }
}

/// Failed, cancelled and expired requests get a delivery too; non-terminal
/// transitions and an idempotent repeat complete create none; due
/// deliveries come oldest due first.
pub async fn webhook_deliveries_only_for_terminal_transitions(store: &dyn Store) {
    let t0 = base();
    let queued = submit(store, hooked("q-c"), t0).await;
    let mut new = hooked("q-d");
    new.timeout = Some(secs(5));
    let expiring = submit(store, new, t0).await;
    let mut new = hooked("q-f");
    new.max_attempts = 2;
    let failing = submit(store, new, t0).await;
    let c = claim_one(store, "q-f", t0).await;
    let retry = settle(store, &failing.id, &token(&c), failure(true), at(t0, 100))
        .await
        .expect("retry");
    assert_eq!(retry.reply, None);
    assert!(
        claim_due(store, at(t0, 200), secs(30)).await.is_empty(),
        "nothing terminal yet"
    );

    let (_, cancelled) = store
        .request_cancel(as_tenant(&queued.id, super::TENANT), at(t0, 1_000))
        .await
        .expect("cancel");
    assert_eq!(cancelled.reply, Some(hook()));
    let expired = store
        .deadline_expire_due(at(t0, 5_000), 10)
        .await
        .expect("expire");
    assert_eq!(expired[0].reply, Some(hook()));
    let c = claim_one(store, "q-f", at(t0, 10_000)).await;
    let dead = settle(
        store,
        &failing.id,
        &token(&c),
        failure(false),
        at(t0, 11_000),
    )
    .await
    .expect("dead-letter");
    assert_eq!(dead.reply, Some(hook()));
    let again = settle(
        store,
        &failing.id,
        &token(&c),
        completion("1"),
        at(t0, 11_001),
    )
    .await;
    assert!(again.is_err(), "a failed request cannot complete");

    let got = claim_due(store, at(t0, 12_000), secs(30)).await;
    let ids: Vec<_> = got.iter().map(|d| d.request_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            queued.id.as_str(),
            expiring.id.as_str(),
            failing.id.as_str()
        ],
        "oldest due first"
    );
    for (d, status) in got
        .iter()
        .zip([Status::Cancelled, Status::Expired, Status::Failed])
    {
        let body: ReplyMessage = serde_json::from_str(&d.body).expect("reply message");
        assert_eq!(body.status, status);
        assert!(body.error.is_some() && body.output.is_none());
    }
}

/// A request that dead-letters into a fallback creates no delivery; the
/// fallback does when it ends (here failing too, as the end of the chain).
pub async fn fallback_chain_delivers_once_for_its_last_request(store: &dyn Store) {
    let t0 = base();
    let mut new = hooked("q-primary");
    new.max_attempts = 1;
    new.fallback_queue = Some("q-fallback".into());
    let first = submit(store, new, t0).await;
    let c = claim_one(store, "q-primary", t0).await;
    let changed = settle(store, &first.id, &token(&c), failure(false), at(t0, 1_000))
        .await
        .expect("fail");
    let fb = changed.spawned.clone().expect("a fallback");
    assert_eq!(changed.reply, None);
    assert_eq!(fb.reply_to, Some(hook()));
    assert!(
        claim_due(store, at(t0, 1_500), secs(30)).await.is_empty(),
        "no delivery yet"
    );
    assert_eq!(
        store.due_times(at(t0, 1_500)).await.expect("due").webhook,
        None
    );

    let c = claim_one(store, "q-fallback", at(t0, 2_000)).await;
    let end = settle(store, &fb.id, &token(&c), failure(false), at(t0, 3_000))
        .await
        .expect("fail");
    assert!(end.spawned.is_none(), "a fallback has no fallback queue");
    assert_eq!(end.reply, Some(hook()));
    let got = claim_due(store, at(t0, 4_000), secs(30)).await;
    assert_eq!(got.len(), 1, "one delivery for the chain");
    assert_eq!(got[0].request_id, fb.id);
    let body: ReplyMessage = serde_json::from_str(&got[0].body).expect("reply message");
    assert_eq!(
        (body.status, body.queue.as_str()),
        (Status::Failed, "q-fallback")
    );
    assert_eq!(body.correlation_id.as_deref(), Some("corr-hook"));
}
