//! `deadline_expire_due`: unfinished requests past their deadline expire;
//! nothing else does.

use std::collections::BTreeSet;

use coatcheck_core::{EventKind, Status};

use super::new_request;
use super::support::*;
use crate::{HeartbeatParams, Store, StoreError};

/// A queued and a running request past their deadline both expire (the
/// running one's lease is fenced); requests without a deadline or with a
/// later one stay as they were.
pub async fn deadline_expires_queued_and_running_requests(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-run");
    new.timeout = Some(secs(60));
    submit(store, new, t0).await;
    let running = claim(store, "q-run", WORKER, 1, secs(300), t0)
        .await
        .pop()
        .expect("claimed");

    let mut new = new_request("q-wait");
    new.timeout = Some(secs(60));
    let queued = submit(store, new, t0).await;
    let untimed = submit_to(store, "q-wait", t0).await;
    let mut new = new_request("q-wait");
    new.timeout = Some(secs(600));
    let later = submit(store, new, t0).await;

    let t1 = at(t0, 60_000);
    let changed = store.deadline_expire_due(t1, 100).await.expect("sweep");
    let ids: BTreeSet<&str> = changed.iter().map(|c| c.request.id.as_str()).collect();
    assert_eq!(
        ids,
        BTreeSet::from([running.id.as_str(), queued.id.as_str()])
    );
    for c in &changed {
        assert_stored(store, c, "an expiry").await;
        let r = &c.request;
        assert_eq!(
            (r.status, r.finished_at, r.run_after),
            (Status::Expired, Some(t1), None)
        );
        assert!(r.lease.is_none());
        assert_eq!(
            r.error.as_ref().and_then(|e| e.code.as_deref()),
            Some("deadline_exceeded")
        );
        let from = if r.id == running.id {
            Status::Running
        } else {
            Status::Queued
        };
        match &history(store, &r.id).await.last().expect("events").kind {
            EventKind::Expired { from: f } => assert_eq!(*f, from),
            other => panic!("expected expired, got {other:?}"),
        }
    }
    assert_eq!(
        kinds(store, &running.id).await,
        ["submitted", "claimed", "expired"]
    );
    assert_eq!(kinds(store, &queued.id).await, ["submitted", "expired"]);
    assert_unchanged(store, &untimed, "a sweep past a request without deadline").await;
    assert_unchanged(store, &later, "a sweep before a request's deadline").await;
    assert!(store
        .deadline_expire_due(t1, 100)
        .await
        .expect("second sweep")
        .is_empty());

    let expired = get(store, &running.id).await;
    let tok = token(&running);
    let err = expect_err(
        settle(store, &running.id, &tok, completion("1"), at(t1, 1)).await,
        "complete",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Expired
            }
        ),
        "{err:?}"
    );
    let beat = HeartbeatParams {
        id: running.id.clone(),
        lease_token: tok,
        progress: None,
        extend: None,
        now: at(t1, 1),
    };
    let err = expect_err(store.lease_heartbeat(beat).await, "heartbeat");
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Expired
            }
        ),
        "{err:?}"
    );
    assert_unchanged(store, &expired, "worker calls on an expired request").await;
    assert!(store
        .lease_expire_due(at(t0, 400_000), 100)
        .await
        .expect("lease sweep")
        .is_empty());
}

/// Before the deadline, and after the request finished, a sweep changes
/// nothing.
pub async fn deadline_not_yet_due_changes_nothing(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-deadline");
    new.timeout = Some(secs(60));
    let queued = submit(store, new, t0).await;
    assert_eq!(queued.deadline, Some(at(t0, 60_000)));

    let mut new = new_request("q-done");
    new.timeout = Some(secs(60));
    submit(store, new, t0).await;
    let r = claim_one(store, "q-done", t0).await;
    let done = settle(store, &r.id, &token(&r), completion("1"), at(t0, 1_000))
        .await
        .expect("complete")
        .request;

    assert!(store
        .deadline_expire_due(at(t0, 59_999), 100)
        .await
        .expect("early sweep")
        .is_empty());
    assert_unchanged(store, &queued, "a sweep before the deadline").await;

    let changed = store
        .deadline_expire_due(at(t0, 60_000), 100)
        .await
        .expect("sweep");
    assert_eq!(
        changed
            .iter()
            .map(|c| c.request.id.as_str())
            .collect::<Vec<_>>(),
        [queued.id.as_str()]
    );
    assert_unchanged(store, &done, "a sweep past a finished request's deadline").await;
}

/// A sweep expires at most `limit` requests; the next sweep takes the rest.
pub async fn deadline_expiry_respects_its_limit(store: &dyn Store) {
    let t0 = base();
    let mut all = BTreeSet::new();
    for i in 0..3 {
        let mut new = new_request("q-deadline");
        new.timeout = Some(secs(10));
        all.insert(submit(store, new, at(t0, i)).await.id);
    }
    let t1 = at(t0, 20_000);
    let mut expired = BTreeSet::new();
    for expected in [2, 1, 0] {
        let changed = store.deadline_expire_due(t1, 2).await.expect("sweep");
        assert_eq!(changed.len(), expected, "a sweep with limit 2");
        for c in changed {
            assert_eq!(c.request.status, Status::Expired);
            assert!(
                expired.insert(c.request.id.clone()),
                "{} expired twice",
                c.request.id
            );
        }
    }
    assert_eq!(expired, all);
}

/// A queued request past its deadline is not claimed, even before a sweep
/// has expired it.
pub async fn expired_request_is_not_claimable(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-late");
    new.timeout = Some(secs(60));
    let req = submit(store, new, t0).await;

    let t1 = at(t0, 60_000);
    assert!(
        claim(store, "q-late", WORKER, 10, LEASE, t1)
            .await
            .is_empty(),
        "claimed past its deadline"
    );
    assert_unchanged(store, &req, "a claim past the deadline").await;

    assert_eq!(
        store
            .deadline_expire_due(t1, 10)
            .await
            .expect("sweep")
            .len(),
        1
    );
    let expired = get(store, &req.id).await;
    assert_eq!(expired.status, Status::Expired);
    assert!(claim(store, "q-late", WORKER, 10, LEASE, at(t1, 1))
        .await
        .is_empty());
    assert_unchanged(store, &expired, "a claim of an expired request").await;
}
