//! `request_settle_many`: failures, retries and backoff, dead-letters and
//! their fallbacks, and the independence of batch items.

use std::collections::BTreeMap;
use std::time::Duration;

use coatcheck_core::clock::to_micros;
use coatcheck_core::model::new_request_id;
use coatcheck_core::{EventKind, ReplyTo, Request, RetryPolicy, Status, Ts};

use super::support::*;
use super::{new_request, TENANT};
use crate::{Changed, SettleParams, Settlement, Store, StoreError};

/// Asserts `run_after` lies in the default policy's band for `attempt`,
/// counted from `now` (with a millisecond of slack for stored precision).
#[track_caller]
fn assert_backoff(run_after: Option<Ts>, now: Ts, attempt: u32) {
    let policy = RetryPolicy::default();
    let low = to_micros(now) + policy.delay(attempt, 0.0).as_micros() as i64 - 1_000;
    let high = to_micros(now) + policy.delay(attempt, 1.0).as_micros() as i64 + 1_000;
    let got = to_micros(run_after.expect("a run_after"));
    assert!(
        (low..=high).contains(&got),
        "run_after of attempt {attempt} is {}µs after now",
        got - to_micros(now)
    );
}

/// Asserts the last event is `attempt_failed` for `attempt` with the
/// request's `run_after` and the `boom` error.
async fn assert_attempt_failed(store: &dyn Store, req: &Request, attempt: u32) {
    let events = history(store, &req.id).await;
    match &events.last().expect("events").kind {
        EventKind::AttemptFailed {
            attempt: a,
            error,
            run_after,
        } => {
            assert_eq!(*a, attempt);
            assert_eq!(error.code.as_deref(), Some("boom"));
            assert_eq!(Some(to_micros(*run_after)), req.run_after.map(to_micros));
        }
        other => panic!("expected attempt_failed, got {other:?}"),
    }
}

/// A retryable failure with attempts left puts the request back in the
/// queue after the policy's backoff (growing per attempt); the last attempt's
/// failure dead-letters it.
pub async fn fail_retryable_requeues_with_backoff(store: &dyn Store) {
    let t0 = base();
    let req = running_in(store, "q-retry", t0).await;
    let mut tok = token(&req);
    let mut now = at(t0, 5_000);

    for attempt in 1..=2 {
        let changed = settle(store, &req.id, &tok, failure(true), now)
            .await
            .expect("fail");
        assert_stored(store, &changed, "a retryable failure").await;
        let r = changed.request;
        assert_eq!((r.status, r.attempts), (Status::Queued, attempt));
        assert_backoff(r.run_after, now, attempt);
        let error = r.error.as_ref().expect("the error is kept");
        assert_eq!(
            (error.code.as_deref(), error.message.as_str()),
            (Some("boom"), "it broke")
        );
        let details = error.details.as_ref().expect("details");
        assert_eq!(details.clone(), json(r#"{"line":3}"#));
        assert!(r.lease.is_none() && r.finished_at.is_none() && r.output.is_none());
        assert_eq!(r.updated_at, now);
        assert_attempt_failed(store, &r, attempt).await;

        assert!(
            claim(store, "q-retry", WORKER, 10, LEASE, now)
                .await
                .is_empty(),
            "not before run_after"
        );
        assert_unchanged(store, &r, "a claim before the backoff ran out").await;

        let ready = r.run_after.expect("run_after");
        let next = claim_one(store, "q-retry", ready).await;
        assert_eq!(
            (next.id.as_str(), next.attempts),
            (req.id.as_str(), attempt + 1)
        );
        tok = token(&next);
        now = at(ready, 1_000);
    }

    let changed = settle(store, &req.id, &tok, failure(true), now)
        .await
        .expect("last fail");
    assert_stored(store, &changed, "the last failure").await;
    let r = &changed.request;
    assert_eq!(
        (r.status, r.attempts, r.finished_at, r.run_after),
        (Status::Failed, 3, Some(now), None)
    );
    assert_eq!(
        r.error.as_ref().and_then(|e| e.code.as_deref()),
        Some("boom")
    );
    assert_eq!(
        kinds(store, &req.id).await,
        [
            "submitted",
            "claimed",
            "attempt_failed",
            "claimed",
            "attempt_failed",
            "claimed",
            "failed"
        ]
    );
}

/// A failure's `retry_after` replaces the backoff, to the millisecond.
pub async fn fail_with_retry_after_sets_run_after(store: &dyn Store) {
    let t0 = base();
    let req = running_in(store, "q-retry-after", t0).await;
    let t1 = at(t0, 2_000);
    let settlement = Settlement::Fail {
        error: boom(),
        retryable: true,
        retry_after: Some(Duration::from_millis(300)),
    };
    let changed = settle(store, &req.id, &token(&req), settlement, t1)
        .await
        .expect("fail");
    assert_stored(store, &changed, "the failure").await;
    let r = &changed.request;
    assert_eq!((r.status, r.run_after), (Status::Queued, Some(at(t1, 300))));
    assert_attempt_failed(store, r, 1).await;

    assert!(claim(store, "q-retry-after", WORKER, 1, LEASE, at(t1, 299))
        .await
        .is_empty());
    assert_unchanged(store, r, "a claim before retry_after").await;
    assert_eq!(
        claim_one(store, "q-retry-after", at(t1, 300))
            .await
            .attempts,
        2
    );
}

/// A failure that is not retryable dead-letters at once, attempts left or
/// not.
pub async fn fail_not_retryable_dead_letters(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-fatal");
    new.max_attempts = 5;
    submit(store, new, t0).await;
    let req = claim_one(store, "q-fatal", t0).await;
    let t1 = at(t0, 1_000);

    let changed = settle(store, &req.id, &token(&req), failure(false), t1)
        .await
        .expect("fail");
    assert_stored(store, &changed, "a fatal failure").await;
    let r = &changed.request;
    assert_eq!(
        (r.status, r.attempts, r.finished_at),
        (Status::Failed, 1, Some(t1))
    );
    assert!(r.lease.is_none() && r.run_after.is_none());
    assert_eq!(
        r.error.as_ref().map(|e| e.message.as_str()),
        Some("it broke")
    );
    let events = history(store, &req.id).await;
    assert_eq!(
        events.iter().map(|e| e.kind.name()).collect::<Vec<_>>(),
        ["submitted", "claimed", "failed"]
    );
    assert!(
        matches!(&events[2].kind, EventKind::Failed { attempt: 1, error } if error.code.as_deref() == Some("boom"))
    );

    assert!(claim(store, "q-fatal", WORKER, 10, LEASE, at(t1, 60_000))
        .await
        .is_empty());
    let err = expect_err(
        settle(store, &req.id, &token(&req), failure(true), at(t1, 1)).await,
        "fail again",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Failed
            }
        ),
        "{err:?}"
    );
    assert_unchanged(store, r, "a claim and a fail of a dead-lettered request").await;
}

/// A failure after a cancel was requested ends the request `cancelled`.
pub async fn fail_after_cancel_requested_cancels(store: &dyn Store) {
    let t0 = base();
    let req = running_in(store, "q-cancel-fail", t0).await;
    store
        .request_cancel(as_tenant(&req.id, TENANT), at(t0, 1_000))
        .await
        .expect("cancel");

    let t1 = at(t0, 2_000);
    let changed = settle(store, &req.id, &token(&req), failure(true), t1)
        .await
        .expect("fail");
    assert_stored(store, &changed, "the failure").await;
    let r = &changed.request;
    assert_eq!(
        (r.status, r.finished_at, r.run_after),
        (Status::Cancelled, Some(t1), None)
    );
    assert!(r.cancel_requested && r.lease.is_none());
    assert_eq!(
        r.error.as_ref().and_then(|e| e.code.as_deref()),
        Some("cancelled")
    );
    assert_eq!(
        kinds(store, &req.id).await,
        ["submitted", "claimed", "cancel_requested", "cancelled"]
    );
}

/// Each item of a batch settles as its single call would, in order: a stale
/// token or an unknown id fails only its own item.
pub async fn settle_many_items_are_independent(store: &dyn Store) {
    let t0 = base();
    for i in 0..3 {
        submit_to(store, "q-batch", at(t0, i)).await;
    }
    let running = claim(store, "q-batch", WORKER, 3, LEASE, at(t0, 10)).await;
    assert_eq!(running.len(), 3);
    let (a, b, c) = (&running[0], &running[1], &running[2]);
    let unknown = new_request_id();
    let item = |id: &str, tok: &str, s: Settlement| SettleParams {
        queue: None,
        id: id.into(),
        lease_token: tok.into(),
        settlement: s,
    };

    let t1 = at(t0, 1_000);
    let results = store
        .request_settle_many(
            vec![
                item(&a.id, &token(a), completion(r#"{"a":1}"#)),
                item(&b.id, "stale-token", completion(r#"{"b":1}"#)),
                item(&c.id, &token(c), failure(false)),
                item(&unknown, "any-token", completion("null")),
                item(&a.id, &token(a), completion(r#"{"a":1}"#)),
            ],
            t1,
        )
        .await
        .expect("settle_many");
    assert_eq!(results.len(), 5, "one result per item");

    let ok = |i: usize| -> &Changed {
        results[i]
            .as_ref()
            .unwrap_or_else(|e| panic!("item {i}: {e:?}"))
    };
    assert_eq!(
        (ok(0).request.id.as_str(), ok(0).request.status),
        (a.id.as_str(), Status::Succeeded)
    );
    assert!(
        matches!(
            &results[1],
            Err(StoreError::LeaseLost {
                status: Status::Running
            })
        ),
        "{:?}",
        results[1]
    );
    assert_eq!(
        (ok(2).request.id.as_str(), ok(2).request.status),
        (c.id.as_str(), Status::Failed)
    );
    assert!(
        matches!(&results[3], Err(StoreError::NotFound)),
        "{:?}",
        results[3]
    );
    assert_same(
        &ok(4).request,
        &ok(0).request,
        "a repeated item is idempotent",
    );

    assert_stored(store, ok(0), "item 0").await;
    assert_stored(store, ok(2), "item 2").await;
    assert_unchanged(store, b, "the stale item").await;
    assert_eq!(
        kinds(store, &a.id).await,
        ["submitted", "claimed", "succeeded"]
    );

    let later = settle(
        store,
        &b.id,
        &token(b),
        completion(r#"{"b":2}"#),
        at(t0, 2_000),
    )
    .await
    .expect("b");
    assert_eq!(
        later.request.status,
        Status::Succeeded,
        "the refused item's lease is intact"
    );

    let none = store
        .request_settle_many(Vec::new(), at(t0, 3_000))
        .await
        .expect("an empty batch");
    assert!(none.is_empty());
}

/// Checks a fallback spawned by `first`'s dead-letter at `now`.
async fn assert_fallback(
    store: &dyn Store,
    changed: &Changed,
    original: &Request,
    queue: &str,
    now: Ts,
) {
    let first = &changed.request;
    let fb = changed.spawned.as_ref().expect("a fallback was spawned");
    assert_eq!(first.status, Status::Failed);
    assert_eq!(first.fallback_request_id.as_deref(), Some(fb.id.as_str()));
    assert_ne!(fb.id, first.id);
    assert_eq!(
        (fb.queue.as_str(), fb.status, fb.attempts),
        (queue, Status::Queued, 0)
    );
    assert_eq!(fb.fallback_of.as_deref(), Some(first.id.as_str()));
    assert_eq!(fb.fallback_queue, None);
    assert_eq!(fb.input.get(), original.input.get(), "the same input bytes");
    assert_eq!(fb.correlation_id, original.correlation_id);
    assert_eq!(fb.reply_to, original.reply_to);
    assert_eq!(fb.metadata, original.metadata);
    assert_eq!(
        (fb.tenant.as_str(), fb.priority, fb.max_attempts),
        (TENANT, original.priority, original.max_attempts)
    );
    assert_eq!(fb.fairness_key, original.fairness_key);
    assert_eq!(
        (fb.created_at, fb.run_after, fb.deadline),
        (now, None, None)
    );

    assert_same(
        &get(store, &first.id).await,
        first,
        "the first request as stored",
    );
    assert_same(&get(store, &fb.id).await, fb, "the fallback as stored");
    let last = history(store, &first.id).await.pop().expect("events");
    match last.kind {
        EventKind::FallbackSubmitted {
            fallback_request_id,
            queue: q,
        } => {
            assert_eq!(
                (fallback_request_id.as_str(), q.as_str()),
                (fb.id.as_str(), queue)
            );
        }
        other => panic!("expected fallback_submitted, got {other:?}"),
    }
    assert_eq!(kinds(store, &fb.id).await, ["submitted", "fallback_of"]);
    let claimed = claim_one(store, queue, at(now, 1)).await;
    assert_eq!(claimed.id, fb.id, "the fallback is claimable in its queue");
}

/// A request with a fallback queue that dead-letters (here: attempts used
/// up) spawns the fallback in the same write; a retry does not.
pub async fn fallback_queue_spawns_a_linked_request_on_dead_letter(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-primary");
    new.input = raw(r#"{"prompt": "hi" }"#);
    new.correlation_id = Some("corr-fb".into());
    new.priority = 3;
    new.max_attempts = 2;
    new.timeout = Some(secs(3_600));
    new.reply_to = Some(ReplyTo::Channel("replies".into()));
    new.metadata = BTreeMap::from([("model".to_string(), "big".to_string())]);
    new.fallback_queue = Some("q-fallback".into());
    new.fairness_key = Some("fk".into());
    let original = submit(store, new, t0).await;

    let first = claim_one(store, "q-primary", t0).await;
    let t1 = at(t0, 1_000);
    let retry = Settlement::Fail {
        error: boom(),
        retryable: true,
        retry_after: Some(secs(1)),
    };
    let changed = settle(store, &first.id, &token(&first), retry, t1)
        .await
        .expect("first fail");
    assert_eq!(changed.request.status, Status::Queued);
    assert_stored(store, &changed, "a retry spawns no fallback").await;

    let second = claim_one(store, "q-primary", at(t1, 1_000)).await;
    let t2 = at(t1, 2_000);
    let changed = settle(store, &second.id, &token(&second), failure(true), t2)
        .await
        .expect("last fail");
    assert_fallback(store, &changed, &original, "q-fallback", t2).await;
    assert_eq!(
        kinds(store, &original.id).await,
        [
            "submitted",
            "claimed",
            "attempt_failed",
            "claimed",
            "failed",
            "fallback_submitted"
        ]
    );
}

/// A dead-letter by lease expiry spawns the fallback too.
pub async fn fallback_queue_spawns_on_lease_expiry_dead_letter(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-primary");
    new.max_attempts = 1;
    new.fallback_queue = Some("q-fallback".into());
    let original = submit(store, new, t0).await;
    claim_one(store, "q-primary", t0).await;

    let t1 = at(t0, 30_000);
    let changed = store.lease_expire_due(t1, 10).await.expect("sweep");
    assert_eq!(changed.len(), 1);
    assert_fallback(store, &changed[0], &original, "q-fallback", t1).await;
    assert_eq!(
        kinds(store, &original.id).await,
        [
            "submitted",
            "claimed",
            "lease_expired",
            "failed",
            "fallback_submitted"
        ]
    );
}
