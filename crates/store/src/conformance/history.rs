//! `request_history`: every change lands once, numbered 1, 2, 3 … and timed
//! by the `now` of the call that made it.

use coatcheck_core::model::new_request_id;
use coatcheck_core::{EventKind, HistoryEvent, Status, Ts};

use super::support::*;
use super::TENANT;
use crate::{HeartbeatParams, RequestRef, Settlement, Store, StoreError};

fn beat(id: &str, token: &str, progress: &str, now: Ts) -> HeartbeatParams {
    HeartbeatParams {
        id: id.into(),
        lease_token: token.into(),
        progress: Some(raw(progress)),
        extend: None,
        now,
    }
}

/// A request through every kind of change: claim, progress, a retry, a lease
/// expiry, a cancel request, a cancel, a redrive and a success. The history
/// has one event per change, seq 1..=n without gaps, each at its call's `now`.
pub async fn history_is_gapless_and_ordered_for_a_full_life(store: &dyn Store) {
    let t0 = base();
    let t = |s: u64| at(t0, s * 1_000);
    let q = "q-life";
    let req = submit_to(store, q, t(0)).await;
    let id = req.id.as_str();
    let mut expected: Vec<(&str, Ts)> = vec![("submitted", t(0))];

    let r = claim_one(store, q, t(1)).await;
    expected.push(("claimed", t(1)));
    store
        .lease_heartbeat(beat(id, &token(&r), r#"{"step":1}"#, t(2)))
        .await
        .expect("heartbeat");
    expected.push(("progress", t(2)));
    let retry = Settlement::Fail {
        error: boom(),
        retryable: true,
        retry_after: Some(secs(1)),
    };
    settle(store, id, &token(&r), retry, t(3))
        .await
        .expect("fail");
    expected.push(("attempt_failed", t(3)));

    claim_one(store, q, t(4)).await;
    expected.push(("claimed", t(4)));
    assert_eq!(
        store
            .lease_expire_due(t(34), 10)
            .await
            .expect("sweep")
            .len(),
        1
    );
    expected.push(("lease_expired", t(34)));

    let r = claim_one(store, q, t(35)).await;
    expected.push(("claimed", t(35)));
    store
        .request_cancel(RequestRef::any(id), t(36))
        .await
        .expect("cancel");
    expected.push(("cancel_requested", t(36)));
    store
        .lease_heartbeat(beat(id, &token(&r), r#"{"step":2}"#, t(37)))
        .await
        .expect("heartbeat");
    expected.push(("progress", t(37)));
    settle(store, id, &token(&r), failure(true), t(38))
        .await
        .expect("give up");
    expected.push(("cancelled", t(38)));

    store
        .dead_letter_redrive(RequestRef::any(id), t(39))
        .await
        .expect("redrive");
    expected.push(("redriven", t(39)));
    let r = claim_one(store, q, t(40)).await;
    expected.push(("claimed", t(40)));
    let done = settle(store, id, &token(&r), completion("42"), t(41))
        .await
        .expect("complete");
    expected.push(("succeeded", t(41)));
    assert_eq!(done.request.status, Status::Succeeded);

    let events = history(store, id).await;
    let got: Vec<(u64, &str, Ts)> = events
        .iter()
        .map(|e| (e.seq, e.kind.name(), e.at))
        .collect();
    let want: Vec<(u64, &str, Ts)> = expected
        .iter()
        .enumerate()
        .map(|(i, (kind, at))| (i as u64 + 1, *kind, *at))
        .collect();
    assert_eq!(got, want);
    assert_eq!(get(store, id).await.history_seq, want.len() as u64);

    let attempts: Vec<u32> = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Claimed { attempt, .. } => Some(attempt),
            _ => None,
        })
        .collect();
    assert_eq!(
        attempts,
        [1, 2, 3, 1],
        "attempts count up and start again after a redrive"
    );
    match &events[2].kind {
        EventKind::Progress { progress } => assert_eq!(progress.clone(), json(r#"{"step":1}"#)),
        other => panic!("expected progress, got {other:?}"),
    }
    assert!(matches!(events[9].kind, EventKind::Cancelled));
    assert!(matches!(
        events[10].kind,
        EventKind::Redriven {
            from: Status::Cancelled
        }
    ));

    let scoped = store
        .request_history(as_tenant(id, TENANT), 0)
        .await
        .expect("history as the owner");
    assert_eq!(seqs(&scoped), seqs(&events));
}

fn seqs(events: &[HistoryEvent]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// `after_seq` returns exactly the events after it, oldest first.
pub async fn history_after_seq_returns_only_later_events(store: &dyn Store) {
    let t0 = base();
    let req = running_in(store, "q-after", t0).await;
    store
        .lease_heartbeat(beat(&req.id, &token(&req), "1", at(t0, 1)))
        .await
        .expect("heartbeat");
    settle(store, &req.id, &token(&req), completion("2"), at(t0, 2))
        .await
        .expect("complete");
    let all = history(store, &req.id).await;
    assert_eq!(seqs(&all), [1, 2, 3, 4]);

    for after in 0..=5u64 {
        let got = store
            .request_history(RequestRef::any(&req.id), after)
            .await
            .expect("history");
        let want: Vec<(u64, &str, Ts)> = all
            .iter()
            .filter(|e| e.seq > after)
            .map(|e| (e.seq, e.kind.name(), e.at))
            .collect();
        let got: Vec<(u64, &str, Ts)> = got.iter().map(|e| (e.seq, e.kind.name(), e.at)).collect();
        assert_eq!(got, want, "after {after}");
    }

    let err = expect_err(
        store.request_history(as_tenant(&req.id, "t2"), 2).await,
        "history as t2",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = expect_err(
        store
            .request_history(RequestRef::any(new_request_id()), 2)
            .await,
        "unknown",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
}
