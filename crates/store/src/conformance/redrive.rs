//! `dead_letter_redrive`: failed, cancelled and expired requests go back to
//! the queue with fresh attempts; nothing else does.

use coatcheck_core::model::new_request_id;
use coatcheck_core::{EventKind, Request, Status, Ts};

use super::support::*;
use super::{new_request, TENANT};
use crate::{RequestRef, Store, StoreError};

/// Asserts a redriven request is queued afresh, and its last event says
/// where from.
async fn assert_redriven(store: &dyn Store, r: &Request, from: Status, now: Ts) {
    assert_eq!(
        (r.status, r.attempts, r.cancel_requested),
        (Status::Queued, 0, false)
    );
    assert!(r.error.is_none() && r.output.is_none() && r.lease.is_none());
    assert_eq!(
        (r.finished_at, r.run_after, r.updated_at),
        (None, None, now)
    );
    match &history(store, &r.id).await.last().expect("events").kind {
        EventKind::Redriven { from: f } => assert_eq!(*f, from),
        other => panic!("expected redriven, got {other:?}"),
    }
}

/// A dead-lettered request (attempts used up) is queued again with its
/// attempts reset, and can be claimed as attempt 1.
pub async fn redrive_failed_resets_attempts(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-redrive");
    new.max_attempts = 2;
    let req = submit(store, new, t0).await;
    claim_one(store, "q-redrive", t0).await;
    assert_eq!(
        store
            .lease_expire_due(at(t0, 30_000), 10)
            .await
            .expect("sweep")
            .len(),
        1
    );
    claim_one(store, "q-redrive", at(t0, 30_000)).await;
    let failed = store
        .lease_expire_due(at(t0, 60_000), 10)
        .await
        .expect("sweep");
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (failed[0].request.status, failed[0].request.attempts),
        (Status::Failed, 2)
    );
    assert!(claim(store, "q-redrive", WORKER, 1, LEASE, at(t0, 61_000))
        .await
        .is_empty());

    let t1 = at(t0, 62_000);
    let changed = store
        .dead_letter_redrive(RequestRef::any(&req.id), t1)
        .await
        .expect("redrive");
    assert_stored(store, &changed, "the redrive").await;
    assert_redriven(store, &changed.request, Status::Failed, t1).await;
    assert_eq!(changed.request.max_attempts, 2);

    let again = claim_one(store, "q-redrive", t1).await;
    assert_eq!((again.id.as_str(), again.attempts), (req.id.as_str(), 1));
    match &history(store, &req.id).await.last().expect("events").kind {
        EventKind::Claimed { attempt, .. } => assert_eq!(*attempt, 1),
        other => panic!("expected claimed, got {other:?}"),
    }
}

/// Cancelled and expired requests are redriven too; a deadline that already
/// passed is dropped, a future one kept.
pub async fn redrive_cancelled_and_expired_requeue(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-cancelled");
    new.timeout = Some(secs(600));
    let cancelled = submit(store, new, t0).await;
    store
        .request_cancel(RequestRef::any(&cancelled.id), at(t0, 1))
        .await
        .expect("cancel");

    let mut new = new_request("q-expired");
    new.timeout = Some(secs(10));
    let expired = submit(store, new, t0).await;
    assert_eq!(
        store
            .deadline_expire_due(at(t0, 10_000), 10)
            .await
            .expect("sweep")
            .len(),
        1
    );

    let t1 = at(t0, 20_000);
    let changed = store
        .dead_letter_redrive(as_tenant(&cancelled.id, TENANT), t1)
        .await
        .expect("redrive");
    assert_stored(store, &changed, "the redrive of a cancelled request").await;
    assert_redriven(store, &changed.request, Status::Cancelled, t1).await;
    assert_eq!(
        changed.request.deadline,
        Some(at(t0, 600_000)),
        "a future deadline stays"
    );

    let changed = store
        .dead_letter_redrive(as_tenant(&expired.id, TENANT), t1)
        .await
        .expect("redrive");
    assert_stored(store, &changed, "the redrive of an expired request").await;
    assert_redriven(store, &changed.request, Status::Expired, t1).await;
    assert_eq!(
        changed.request.deadline, None,
        "a passed deadline is dropped"
    );
    assert!(store
        .deadline_expire_due(at(t1, 1), 10)
        .await
        .expect("sweep")
        .is_empty());

    assert_eq!(
        claim_one(store, "q-cancelled", at(t1, 1)).await.id,
        cancelled.id
    );
    assert_eq!(
        claim_one(store, "q-expired", at(t1, 1)).await.id,
        expired.id
    );
}

/// Queued, running and succeeded requests refuse a redrive and stay as they
/// were.
pub async fn redrive_non_terminal_is_wrong_state(store: &dyn Store) {
    let t0 = base();
    let queued = submit_to(store, "q-queued", t0).await;
    let running = running_in(store, "q-running", t0).await;
    let r = running_in(store, "q-succeeded", t0).await;
    let succeeded = settle(store, &r.id, &token(&r), completion("1"), at(t0, 1))
        .await
        .expect("complete")
        .request;

    for before in [&queued, &running, &succeeded] {
        let err = expect_err(
            store
                .dead_letter_redrive(RequestRef::any(&before.id), at(t0, 2))
                .await,
            "redrive",
        );
        assert!(
            matches!(err, StoreError::WrongState { status } if status == before.status),
            "{err:?}"
        );
        assert_unchanged(store, before, "a refused redrive").await;
    }
}

/// A tenant cannot redrive another tenant's request; an unknown id is not
/// found.
pub async fn redrive_of_other_tenant_is_not_found(store: &dyn Store) {
    let t0 = base();
    let r = running_in(store, "q-redrive", t0).await;
    let failed = settle(store, &r.id, &token(&r), failure(false), at(t0, 1))
        .await
        .expect("fail")
        .request;

    let err = expect_err(
        store
            .dead_letter_redrive(as_tenant(&failed.id, "t2"), at(t0, 2))
            .await,
        "redrive as t2",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert_unchanged(store, &failed, "a redrive by another tenant").await;

    let err = expect_err(
        store
            .dead_letter_redrive(RequestRef::any(new_request_id()), t0)
            .await,
        "unknown",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    let changed = store
        .dead_letter_redrive(as_tenant(&failed.id, TENANT), at(t0, 3))
        .await
        .expect("redrive");
    assert_eq!(changed.request.status, Status::Queued);
}
