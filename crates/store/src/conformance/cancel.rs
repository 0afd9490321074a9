//! `request_cancel`: queued cancels at once, running asks the worker,
//! terminal is refused, other tenants see nothing.

use coatcheck_core::model::new_request_id;
use coatcheck_core::rules::CancelOutcome;
use coatcheck_core::{Request, Status};

use super::support::*;
use super::{new_request, TENANT};
use crate::{HeartbeatParams, Store, StoreError};

/// A queued request (here a delayed one) is cancelled at once, and is never
/// claimed.
pub async fn cancel_queued_cancels_at_once(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-cancel");
    new.delay = Some(secs(60));
    let req = submit(store, new, t0).await;

    let t1 = at(t0, 1_000);
    let (outcome, changed) = store
        .request_cancel(as_tenant(&req.id, TENANT), t1)
        .await
        .expect("cancel");
    assert_eq!(outcome, CancelOutcome::Cancelled);
    assert_stored(store, &changed, "the cancel").await;
    let r = &changed.request;
    assert_eq!(
        (r.status, r.finished_at, r.run_after, r.attempts),
        (Status::Cancelled, Some(t1), None, 0)
    );
    assert_eq!(
        r.error.as_ref().and_then(|e| e.code.as_deref()),
        Some("cancelled")
    );
    assert!(!r.cancel_requested);
    assert_eq!(kinds(store, &req.id).await, ["submitted", "cancelled"]);

    assert!(claim(store, "q-cancel", WORKER, 10, LEASE, at(t0, 120_000))
        .await
        .is_empty());
    assert_unchanged(store, r, "a claim of a cancelled request").await;
}

/// Cancelling a running request only asks: `cancel_requested` is set once,
/// the lease stays, the worker sees it, and may still complete.
pub async fn cancel_running_requests_cancel(store: &dyn Store) {
    let t0 = base();
    let req = running_in(store, "q-cancel", t0).await;
    let tok = token(&req);

    let t1 = at(t0, 1_000);
    let (outcome, changed) = store
        .request_cancel(as_tenant(&req.id, TENANT), t1)
        .await
        .expect("cancel");
    assert_eq!(outcome, CancelOutcome::Requested);
    assert_stored(store, &changed, "the cancel request").await;
    let r = changed.request.clone();
    assert_eq!(
        (r.status, r.cancel_requested, r.finished_at),
        (Status::Running, true, None)
    );
    assert_eq!(r.lease, req.lease, "the lease is untouched");
    assert_eq!(
        kinds(store, &req.id).await,
        ["submitted", "claimed", "cancel_requested"]
    );

    let (outcome, again) = store
        .request_cancel(as_tenant(&req.id, TENANT), at(t0, 2_000))
        .await
        .expect("again");
    assert_eq!(outcome, CancelOutcome::Requested);
    assert_same(
        &again.request,
        &r,
        "a repeated cancel request changes nothing",
    );
    assert_unchanged(store, &r, "a repeated cancel request").await;

    let beat = HeartbeatParams {
        id: req.id.clone(),
        lease_token: tok.clone(),
        progress: None,
        extend: None,
        now: at(t0, 3_000),
    };
    let beat = store.lease_heartbeat(beat).await.expect("heartbeat");
    assert!(
        beat.request.cancel_requested,
        "the worker learns it on its heartbeat"
    );

    let done = settle(store, &req.id, &tok, completion(r#""done""#), at(t0, 4_000))
        .await
        .expect("complete");
    assert_stored(store, &done, "the completion").await;
    assert_eq!(
        (done.request.status, done.request.cancel_requested),
        (Status::Succeeded, true)
    );
    assert!(done.request.error.is_none());
}

/// Every terminal request refuses a cancel and stays as it was.
pub async fn cancel_terminal_is_wrong_state(store: &dyn Store) {
    let t0 = base();
    let mut terminal: Vec<Request> = Vec::new();

    let r = running_in(store, "q-succeeded", t0).await;
    terminal.push(
        settle(store, &r.id, &token(&r), completion("1"), at(t0, 1))
            .await
            .expect("complete")
            .request,
    );

    let r = running_in(store, "q-failed", t0).await;
    terminal.push(
        settle(store, &r.id, &token(&r), failure(false), at(t0, 1))
            .await
            .expect("fail")
            .request,
    );

    let r = submit_to(store, "q-cancelled", t0).await;
    terminal.push(
        store
            .request_cancel(as_tenant(&r.id, TENANT), at(t0, 1))
            .await
            .expect("cancel")
            .1
            .request,
    );

    let mut new = new_request("q-expired");
    new.timeout = Some(secs(1));
    let r = submit(store, new, t0).await;
    let expired = store
        .deadline_expire_due(at(t0, 1_000), 10)
        .await
        .expect("deadline sweep");
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].request.id, r.id);
    terminal.push(expired[0].request.clone());

    let statuses: Vec<Status> = terminal.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [
            Status::Succeeded,
            Status::Failed,
            Status::Cancelled,
            Status::Expired
        ]
    );
    for before in &terminal {
        let err = expect_err(
            store
                .request_cancel(as_tenant(&before.id, TENANT), at(t0, 5_000))
                .await,
            "cancel",
        );
        assert!(
            matches!(err, StoreError::WrongState { status } if status == before.status),
            "{err:?}"
        );
        assert_unchanged(store, before, "a cancel of a terminal request").await;
    }
}

/// Another tenant cannot cancel (or even see) a request; an unknown id is
/// not found either.
pub async fn cancel_of_other_tenant_is_not_found(store: &dyn Store) {
    let t0 = base();
    let queued = submit_to(store, "q-cancel", t0).await;
    let err = expect_err(
        store
            .request_cancel(as_tenant(&queued.id, "t2"), at(t0, 1))
            .await,
        "cancel as t2",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert_unchanged(store, &queued, "a cancel by another tenant").await;

    let running = claim_one(store, "q-cancel", at(t0, 2)).await;
    let err = expect_err(
        store
            .request_cancel(as_tenant(&running.id, "t2"), at(t0, 3))
            .await,
        "cancel as t2",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert_unchanged(store, &running, "a cancel by another tenant").await;

    let err = expect_err(
        store
            .request_cancel(as_tenant(&new_request_id(), TENANT), t0)
            .await,
        "cancel unknown",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
}
