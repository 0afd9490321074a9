//! Leases: heartbeats, fencing tokens, and what happens when a lease runs out.

use std::collections::BTreeSet;

use coatcheck_core::{EventKind, Status};

use super::new_request;
use super::support::*;
use crate::{HeartbeatParams, Store, StoreError};

fn beat(
    id: &str,
    token: &str,
    progress: Option<&str>,
    extend: Option<std::time::Duration>,
    now: coatcheck_core::Ts,
) -> HeartbeatParams {
    HeartbeatParams {
        id: id.to_string(),
        lease_token: token.to_string(),
        progress: progress.map(raw),
        extend,
        now,
    }
}

/// A heartbeat renews the lease from `now` (by `extend`, else by the lease's
/// own length), stores the progress bytes and records `progress` only when
/// progress was given.
pub async fn heartbeat_extends_the_lease_and_records_progress(store: &dyn Store) {
    let t0 = base();
    let req = running_in(store, "q-beat", t0).await;
    let tok = token(&req);
    assert_eq!(
        req.lease.as_ref().map(|l| l.expires_at),
        Some(at(t0, 30_000))
    );

    let progress = r#"{"pct": 50 , "step":"resize"}"#;
    let changed = store
        .lease_heartbeat(beat(&req.id, &tok, Some(progress), None, at(t0, 10_000)))
        .await
        .expect("heartbeat");
    assert_stored(store, &changed, "heartbeat with progress").await;
    let r = &changed.request;
    assert_eq!(r.status, Status::Running);
    assert_eq!(
        r.lease.as_ref().map(|l| l.expires_at),
        Some(at(t0, 40_000)),
        "renewed by the lease's length"
    );
    assert_eq!(
        r.lease.as_ref().map(|l| l.token.as_str()),
        Some(tok.as_str()),
        "the token stays"
    );
    assert_eq!(
        r.progress.as_ref().map(|p| p.get()),
        Some(progress),
        "progress bytes kept"
    );
    assert_eq!(r.updated_at, at(t0, 10_000));
    let events = history(store, &req.id).await;
    assert_eq!(
        events.iter().map(|e| e.kind.name()).collect::<Vec<_>>(),
        ["submitted", "claimed", "progress"]
    );
    match &events[2].kind {
        EventKind::Progress { progress: p } => {
            assert_eq!(p.clone(), json(progress), "the event's progress")
        }
        other => panic!("expected progress, got {other:?}"),
    }

    let changed = store
        .lease_heartbeat(beat(&req.id, &tok, None, Some(secs(120)), at(t0, 20_000)))
        .await
        .expect("heartbeat with extend");
    assert_stored(store, &changed, "heartbeat with extend").await;
    assert_eq!(
        changed.request.lease.as_ref().map(|l| l.expires_at),
        Some(at(t0, 140_000))
    );
    assert_eq!(
        changed.request.progress.as_ref().map(|p| p.get()),
        Some(progress),
        "progress stays"
    );
    assert_eq!(
        kinds(store, &req.id).await.len(),
        3,
        "a heartbeat without progress records no event"
    );

    assert!(
        store
            .lease_expire_due(at(t0, 41_000), 10)
            .await
            .expect("expiry")
            .is_empty(),
        "the lease was renewed"
    );
    assert_unchanged(
        store,
        &changed.request,
        "an expiry sweep of a renewed lease",
    )
    .await;

    let changed = store
        .lease_heartbeat(beat(&req.id, &tok, None, None, at(t0, 100_000)))
        .await
        .expect("heartbeat without extend");
    let lease = changed.request.lease.as_ref().expect("leased");
    assert_eq!(
        lease.expires_at,
        at(t0, 130_000),
        "without extend it renews by the claimed length"
    );
    assert_eq!(lease.duration_ms, 30_000);
    assert_stored(store, &changed, "heartbeat without extend").await;
}

/// A heartbeat with a token that is not the live lease is refused and
/// changes nothing, also when it is the right token after the lease ran out.
pub async fn heartbeat_with_stale_token_is_lease_lost(store: &dyn Store) {
    let t0 = base();
    let req = running_in(store, "q-beat", t0).await;

    let err = expect_err(
        store
            .lease_heartbeat(beat(
                &req.id,
                "not-the-token",
                Some(r#"{"x":1}"#),
                None,
                at(t0, 1_000),
            ))
            .await,
        "heartbeat with a wrong token",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Running
            }
        ),
        "{err:?}"
    );
    assert_unchanged(store, &req, "a heartbeat with a wrong token").await;

    let err = expect_err(
        store
            .lease_heartbeat(beat(
                &req.id,
                &token(&req),
                Some(r#"{"x":1}"#),
                None,
                at(t0, 30_000),
            ))
            .await,
        "heartbeat after the lease ran out",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Running
            }
        ),
        "{err:?}"
    );
    assert_unchanged(store, &req, "a heartbeat after the lease ran out").await;

    let err = expect_err(
        store
            .lease_heartbeat(beat(
                &coatcheck_core::model::new_request_id(),
                "t",
                None,
                None,
                t0,
            ))
            .await,
        "heartbeat of an unknown request",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
}

/// Completing with a token that is not the live lease is refused and changes
/// nothing: a wrong token, the right one after the lease ran out, any token
/// on a queued request.
pub async fn complete_with_stale_token_is_lease_lost_and_changes_nothing(store: &dyn Store) {
    let t0 = base();
    let req = running_in(store, "q-stale", t0).await;

    let err = expect_err(
        settle(
            store,
            &req.id,
            "not-the-token",
            completion(r#"{"ok":true}"#),
            at(t0, 1_000),
        )
        .await,
        "complete with a wrong token",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Running
            }
        ),
        "{err:?}"
    );
    assert_unchanged(store, &req, "a complete with a wrong token").await;

    let err = expect_err(
        settle(
            store,
            &req.id,
            &token(&req),
            completion(r#"{"ok":true}"#),
            at(t0, 30_000),
        )
        .await,
        "complete after the lease ran out",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Running
            }
        ),
        "{err:?}"
    );
    assert_unchanged(store, &req, "a complete after the lease ran out").await;

    let queued = submit_to(store, "q-stale-2", at(t0, 2_000)).await;
    let err = expect_err(
        settle(
            store,
            &queued.id,
            &token(&req),
            completion("1"),
            at(t0, 3_000),
        )
        .await,
        "complete of a queued request",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Queued
            }
        ),
        "{err:?}"
    );
    assert_unchanged(store, &queued, "a complete of a queued request").await;
}

/// Completing twice with the token that completed it succeeds and changes
/// nothing (the first output stays); failing with it afterwards is refused.
pub async fn complete_twice_with_the_current_token_is_idempotent(store: &dyn Store) {
    let t0 = base();
    let req = running_in(store, "q-twice", t0).await;
    let tok = token(&req);
    let output = "{\"ok\": true ,\"x\":1.0}";

    let t1 = at(t0, 5_000);
    let done = settle(store, &req.id, &tok, completion(output), t1)
        .await
        .expect("complete");
    assert_stored(store, &done, "the completion").await;
    let r = &done.request;
    assert_eq!((r.status, r.attempts), (Status::Succeeded, 1));
    assert_eq!(
        r.output.as_ref().map(|o| o.get()),
        Some(output),
        "output bytes kept"
    );
    assert_eq!((r.finished_at, r.updated_at), (Some(t1), t1));
    assert!(r.lease.is_none() && r.error.is_none());
    assert_eq!(
        kinds(store, &req.id).await,
        ["submitted", "claimed", "succeeded"]
    );

    let again = settle(store, &req.id, &tok, completion(output), at(t0, 6_000))
        .await
        .expect("complete again");
    assert_same(
        &again.request,
        &done.request,
        "a repeated complete returns the same result",
    );
    assert_unchanged(store, &done.request, "a repeated complete").await;

    let other = settle(
        store,
        &req.id,
        &tok,
        completion(r#"{"other":1}"#),
        at(t0, 7_000),
    )
    .await
    .expect("complete again with another output");
    assert_eq!(
        other.request.output.as_ref().map(|o| o.get()),
        Some(output),
        "the first output stays"
    );
    assert_unchanged(
        store,
        &done.request,
        "a repeated complete with another output",
    )
    .await;

    let err = expect_err(
        settle(store, &req.id, &tok, failure(true), at(t0, 8_000)).await,
        "fail after complete",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Succeeded
            }
        ),
        "{err:?}"
    );
    assert_unchanged(store, &done.request, "a fail after complete").await;
}

/// A lease that runs out with attempts left puts the request back in the
/// queue, claimable at once, and records `lease_expired`.
pub async fn expired_lease_requeues_with_attempts_left(store: &dyn Store) {
    let t0 = base();
    let req = running_in(store, "q-expiry", t0).await;

    assert!(store
        .lease_expire_due(at(t0, 29_999), 10)
        .await
        .expect("early sweep")
        .is_empty());
    assert_unchanged(store, &req, "an expiry sweep before the lease ran out").await;

    let t1 = at(t0, 30_000);
    let changed = store.lease_expire_due(t1, 10).await.expect("sweep");
    assert_eq!(changed.len(), 1);
    let c = &changed[0];
    assert_stored(store, c, "the expiry").await;
    let r = &c.request;
    assert_eq!(r.id, req.id);
    assert_eq!((r.status, r.attempts), (Status::Queued, 1));
    assert!(r.lease.is_none() && r.run_after.is_none() && r.finished_at.is_none());
    assert_eq!(r.updated_at, t1);
    let events = history(store, &req.id).await;
    assert_eq!(
        events.iter().map(|e| e.kind.name()).collect::<Vec<_>>(),
        ["submitted", "claimed", "lease_expired"]
    );
    match &events[2].kind {
        EventKind::LeaseExpired {
            worker_id,
            attempt,
            next_status,
        } => {
            assert_eq!(
                (worker_id.as_str(), *attempt, *next_status),
                (WORKER, 1, Status::Queued)
            );
        }
        other => panic!("expected lease_expired, got {other:?}"),
    }
    assert!(store
        .lease_expire_due(at(t0, 60_000), 10)
        .await
        .expect("second sweep")
        .is_empty());

    let again = claim_one(store, "q-expiry", t1).await;
    assert_eq!((again.id.as_str(), again.attempts), (req.id.as_str(), 2));
}

/// A lease that runs out on the last attempt dead-letters the request as
/// `failed` with a `lease_expired` error.
pub async fn expired_lease_dead_letters_without_attempts_left(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-expiry");
    new.max_attempts = 1;
    submit(store, new, t0).await;
    let req = claim_one(store, "q-expiry", t0).await;

    let t1 = at(t0, 30_000);
    let changed = store.lease_expire_due(t1, 10).await.expect("sweep");
    assert_eq!(changed.len(), 1);
    assert_stored(store, &changed[0], "the dead-letter").await;
    let r = &changed[0].request;
    assert_eq!((r.status, r.attempts), (Status::Failed, 1));
    assert_eq!(r.finished_at, Some(t1));
    assert!(r.lease.is_none());
    assert_eq!(
        r.error.as_ref().and_then(|e| e.code.as_deref()),
        Some("lease_expired")
    );
    let events = history(store, &req.id).await;
    assert_eq!(
        events.iter().map(|e| e.kind.name()).collect::<Vec<_>>(),
        ["submitted", "claimed", "lease_expired", "failed"]
    );
    assert!(matches!(
        events[2].kind,
        EventKind::LeaseExpired {
            next_status: Status::Failed,
            ..
        }
    ));

    assert!(claim(store, "q-expiry", WORKER, 10, LEASE, at(t1, 1_000))
        .await
        .is_empty());
    assert_unchanged(store, r, "a claim of a dead-lettered request").await;
}

/// A lease that runs out after a cancel was requested ends the request
/// `cancelled`, even with attempts left.
pub async fn expired_lease_after_cancel_requested_cancels(store: &dyn Store) {
    let t0 = base();
    let req = running_in(store, "q-expiry", t0).await;
    store
        .request_cancel(as_tenant(&req.id, super::TENANT), at(t0, 1_000))
        .await
        .expect("cancel");

    let t1 = at(t0, 30_000);
    let changed = store.lease_expire_due(t1, 10).await.expect("sweep");
    assert_eq!(changed.len(), 1);
    assert_stored(store, &changed[0], "the expiry").await;
    let r = &changed[0].request;
    assert_eq!((r.status, r.finished_at), (Status::Cancelled, Some(t1)));
    assert_eq!(
        r.error.as_ref().and_then(|e| e.code.as_deref()),
        Some("cancelled")
    );
    assert_eq!(
        kinds(store, &req.id).await,
        [
            "submitted",
            "claimed",
            "cancel_requested",
            "lease_expired",
            "cancelled"
        ]
    );
}

/// A sweep expires at most `limit` leases; the next sweep takes the rest.
pub async fn lease_expiry_respects_its_limit(store: &dyn Store) {
    let t0 = base();
    for i in 0..3 {
        submit_to(store, "q-limit", at(t0, i)).await;
    }
    let claimed = claim(store, "q-limit", WORKER, 3, LEASE, at(t0, 10)).await;
    assert_eq!(claimed.len(), 3);

    let t1 = at(t0, 60_000);
    let mut expired = BTreeSet::new();
    for expected in [2, 1, 0] {
        let changed = store.lease_expire_due(t1, 2).await.expect("sweep");
        assert_eq!(changed.len(), expected, "a sweep with limit 2");
        for c in changed {
            assert_eq!(c.request.status, Status::Queued);
            assert!(
                expired.insert(c.request.id.clone()),
                "{} expired twice",
                c.request.id
            );
        }
    }
    assert_eq!(expired, claimed.iter().map(|r| r.id.clone()).collect());
}

/// After a lease ran out and another worker claimed the request, the first
/// worker's token is refused for heartbeat, complete and fail, and changes
/// nothing — before and after the second worker completes.
pub async fn old_token_is_fenced_after_reclaim(store: &dyn Store) {
    let t0 = base();
    let first = running_in(store, "q-fence", t0).await;
    let old = token(&first);

    let t1 = at(t0, 30_000);
    assert_eq!(
        store.lease_expire_due(t1, 10).await.expect("sweep").len(),
        1
    );
    let second = claim(store, "q-fence", "w-2", 1, LEASE, at(t1, 1_000)).await;
    assert_eq!(second.len(), 1);
    let second = second.into_iter().next().expect("one");
    let new = token(&second);
    assert_ne!(new, old, "a reclaim gets a new token");

    let t2 = at(t1, 2_000);
    let err = expect_err(
        settle(store, &first.id, &old, completion("1"), t2).await,
        "complete with the old token",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Running
            }
        ),
        "{err:?}"
    );
    let err = expect_err(
        settle(store, &first.id, &old, failure(false), t2).await,
        "fail with the old token",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Running
            }
        ),
        "{err:?}"
    );
    let err = expect_err(
        store
            .lease_heartbeat(beat(&first.id, &old, Some("2"), None, t2))
            .await,
        "heartbeat with the old token",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Running
            }
        ),
        "{err:?}"
    );
    assert_unchanged(store, &second, "calls with the old token").await;

    let done = settle(
        store,
        &first.id,
        &new,
        completion(r#""second""#),
        at(t1, 3_000),
    )
    .await
    .expect("complete");
    assert_eq!(done.request.status, Status::Succeeded);
    let err = expect_err(
        settle(
            store,
            &first.id,
            &old,
            completion(r#""first""#),
            at(t1, 4_000),
        )
        .await,
        "complete with the old token after the new one completed",
    );
    assert!(
        matches!(
            err,
            StoreError::LeaseLost {
                status: Status::Succeeded
            }
        ),
        "{err:?}"
    );
    assert_unchanged(store, &done.request, "a complete with the old token").await;
}
