//! `request_claim`: order, limits, what is skipped, and that no request is
//! ever leased twice at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use coatcheck_core::{EventKind, Status};

use super::new_request;
use super::support::*;
use crate::Store;

/// One claim at a time takes the highest priority first, and within a
/// priority the oldest first.
pub async fn claim_takes_highest_priority_then_oldest(store: &dyn Store) {
    let t0 = base();
    let mut ids = BTreeMap::new();
    for (i, (name, priority)) in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1)]
        .into_iter()
        .enumerate()
    {
        let mut new = new_request("q-order");
        new.priority = priority;
        let req = submit(store, new, at(t0, i as u64)).await;
        ids.insert(req.id, name);
    }
    let t1 = at(t0, 1_000);
    let mut order = Vec::new();
    for _ in 0..5 {
        let got = claim_one(store, "q-order", t1).await;
        order.push(ids[&got.id]);
    }
    assert_eq!(order, ["b", "d", "a", "c", "e"]);
    assert!(claim(store, "q-order", WORKER, 10, LEASE, t1)
        .await
        .is_empty());
}

/// A claim returns at most `max` requests, and each only once.
pub async fn claim_respects_max(store: &dyn Store) {
    let t0 = base();
    let mut submitted = BTreeSet::new();
    for i in 0..5 {
        submitted.insert(submit_to(store, "q-max", at(t0, i)).await.id);
    }
    let t1 = at(t0, 1_000);
    let mut claimed = BTreeSet::new();
    for expected in [2, 2, 1, 0] {
        let got = claim(store, "q-max", WORKER, 2, LEASE, t1).await;
        assert_eq!(got.len(), expected, "claim of max 2");
        for r in got {
            assert_eq!(r.status, Status::Running);
            assert!(claimed.insert(r.id.clone()), "{} claimed twice", r.id);
        }
    }
    assert_eq!(claimed, submitted);
    for id in &submitted {
        assert_eq!(get(store, id).await.status, Status::Running);
    }
}

/// A running request under a live lease is not claimed again.
pub async fn claim_skips_a_leased_request(store: &dyn Store) {
    let t0 = base();
    let leased = running_in(store, "q-leased", t0).await;

    for now in [t0, at(t0, 1_000), at(t0, LEASE.as_millis() as u64 - 1)] {
        let got = claim(store, "q-leased", "w-2", 10, LEASE, now).await;
        assert!(got.is_empty(), "claimed a leased request at {now}: {got:?}");
        assert_unchanged(store, &leased, "a claim while leased").await;
    }

    let other = submit_to(store, "q-leased", at(t0, 2_000)).await;
    let got = claim(store, "q-leased", "w-2", 10, LEASE, at(t0, 3_000)).await;
    assert_eq!(
        got.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [other.id.as_str()]
    );
    assert_unchanged(store, &leased, "a claim of another request").await;
}

/// A delayed request is claimable from its `run_after` on, not before.
pub async fn claim_skips_delayed_until_run_after(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-delay");
    new.delay = Some(secs(60));
    let delayed = submit(store, new, t0).await;
    assert_eq!(delayed.run_after, Some(at(t0, 60_000)));

    for now in [t0, at(t0, 30_000), at(t0, 59_999)] {
        let got = claim(store, "q-delay", WORKER, 10, LEASE, now).await;
        assert!(
            got.is_empty(),
            "claimed a delayed request at {now}: {got:?}"
        );
        assert_unchanged(store, &delayed, "a claim before run_after").await;
    }

    let t1 = at(t0, 60_000);
    let got = claim_one(store, "q-delay", t1).await;
    assert_eq!(got.id, delayed.id);
    assert_eq!(got.status, Status::Running);
    assert_eq!(got.run_after, None, "a claim clears run_after");
    assert_same(&get(store, &got.id).await, &got, "the claim is stored");
}

/// A claim takes only its own queue's requests.
pub async fn claim_skips_requests_of_other_queues(store: &dyn Store) {
    let t0 = base();
    let a = submit_to(store, "q-a", t0).await;
    let b = submit_to(store, "q-b", at(t0, 1)).await;
    let t1 = at(t0, 1_000);

    assert!(claim(store, "q-c", WORKER, 10, LEASE, t1).await.is_empty());
    assert!(
        claim(store, "q", WORKER, 10, LEASE, t1).await.is_empty(),
        "queue names match exactly"
    );
    assert_unchanged(store, &a, "a claim of another queue").await;

    let got = claim(store, "q-a", WORKER, 10, LEASE, t1).await;
    assert_eq!(
        got.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [a.id.as_str()]
    );
    assert_unchanged(store, &b, "a claim of another queue").await;
}

/// 200 requests, 8 claimers on their own tasks: every request is claimed
/// exactly once, under the token its claimer was given.
pub async fn concurrent_claims_never_lease_one_request_twice(store: Arc<dyn Store>) {
    const REQUESTS: usize = 200;
    const CLAIMERS: usize = 8;
    let t0 = base();

    let mut submitters = Vec::new();
    for s in 0..CLAIMERS {
        let store = store.clone();
        submitters.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (s..REQUESTS).step_by(CLAIMERS) {
                ids.push(submit_to(&*store, "q-race", at(t0, i as u64)).await.id);
            }
            ids
        }));
    }
    let mut submitted = BTreeSet::new();
    for s in submitters {
        submitted.extend(s.await.expect("a submitter"));
    }
    assert_eq!(submitted.len(), REQUESTS);

    let t1 = at(t0, 10_000);
    let mut claimers = Vec::new();
    for c in 0..CLAIMERS {
        let store = store.clone();
        claimers.push(tokio::spawn(async move {
            let worker = format!("w-{c}");
            let mut got = Vec::new();
            for _ in 0..REQUESTS {
                let batch = claim(&*store, "q-race", &worker, 7, secs(300), t1).await;
                if batch.is_empty() {
                    break;
                }
                got.extend(
                    batch
                        .into_iter()
                        .map(|r| (r.id.clone(), token(&r), worker.clone())),
                );
            }
            got
        }));
    }
    let mut claimed: BTreeMap<String, (String, String)> = BTreeMap::new();
    for c in claimers {
        for (id, token, worker) in c.await.expect("a claimer") {
            if let Some(first) = claimed.insert(id.clone(), (token, worker)) {
                panic!("{id} was claimed twice (first by {})", first.1);
            }
        }
    }
    assert!(
        claim(&*store, "q-race", "w-last", 100, secs(300), t1)
            .await
            .is_empty(),
        "nothing left"
    );
    assert_eq!(claimed.keys().cloned().collect::<BTreeSet<_>>(), submitted);

    let tokens: BTreeSet<&String> = claimed.values().map(|(t, _)| t).collect();
    assert_eq!(tokens.len(), REQUESTS, "every lease token is unique");
    for (id, (token, worker)) in &claimed {
        let req = get(&*store, id).await;
        assert_eq!((req.status, req.attempts), (Status::Running, 1), "{id}");
        let lease = req.lease.as_ref().expect("leased");
        assert_eq!(
            (&lease.token, &lease.worker_id),
            (token, worker),
            "{id} is leased to its claimer"
        );
    }
    let sample = claimed.keys().next().expect("some");
    assert_eq!(kinds(&*store, sample).await, ["submitted", "claimed"]);
}

/// A claim counts an attempt, leases the request to the worker for the
/// lease's length, and records `claimed`; the next claim counts the next.
pub async fn claim_counts_an_attempt_and_records_history(store: &dyn Store) {
    let t0 = base();
    let submitted = submit_to(store, "q-attempts", t0).await;
    let t1 = at(t0, 1_000);
    let got = claim(store, "q-attempts", "w-7", 1, secs(30), t1).await;
    assert_eq!(got.len(), 1);
    let first = &got[0];
    assert_eq!(first.id, submitted.id);
    assert_eq!(
        (first.status, first.attempts, first.max_attempts),
        (Status::Running, 1, 3)
    );
    assert_eq!(first.updated_at, t1);
    let lease = first.lease.as_ref().expect("a lease");
    assert_eq!(lease.worker_id, "w-7");
    assert_eq!(lease.expires_at, at(t1, 30_000));
    assert_eq!(lease.duration_ms, 30_000);
    assert!(!lease.token.is_empty());
    assert_same(&get(store, &first.id).await, first, "the claim is stored");

    let events = history(store, &first.id).await;
    assert_eq!(
        events.iter().map(|e| e.kind.name()).collect::<Vec<_>>(),
        ["submitted", "claimed"]
    );
    assert_eq!((events[1].seq, events[1].at), (2, t1));
    match &events[1].kind {
        EventKind::Claimed {
            worker_id,
            attempt,
            lease_expires_at,
        } => {
            assert_eq!(
                (worker_id.as_str(), *attempt, *lease_expires_at),
                ("w-7", 1, at(t1, 30_000))
            );
        }
        other => panic!("expected claimed, got {other:?}"),
    }

    // The lease runs out; the next claim is attempt 2 under a new token.
    let t2 = at(t1, 30_000);
    let expired = store.lease_expire_due(t2, 10).await.expect("lease expiry");
    assert_eq!(expired.len(), 1);
    let second = claim(store, "q-attempts", "w-8", 1, secs(30), t2).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].attempts, 2);
    assert_ne!(
        token(&second[0]),
        lease.token,
        "a new claim gets a new token"
    );
    match &history(store, &first.id).await.last().expect("events").kind {
        EventKind::Claimed {
            worker_id, attempt, ..
        } => assert_eq!((worker_id.as_str(), *attempt), ("w-8", 2)),
        other => panic!("expected claimed, got {other:?}"),
    }
}
