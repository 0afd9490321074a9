//! `queue_stats` and `due_times`: what operators and background tasks read.

use coatcheck_core::Status;

use super::support::*;
use super::{new_request, TENANT};
use crate::{DueTimes, QueueCounts, RequestRef, Store};

/// The count of `status` in `q` (missing is zero; listed at most once).
fn count(q: &QueueCounts, status: Status) -> u64 {
    let found: Vec<u64> = q
        .counts
        .iter()
        .filter(|(s, _)| *s == status)
        .map(|(_, n)| *n)
        .collect();
    assert!(found.len() <= 1, "{status} is counted twice in {q:?}");
    found.first().copied().unwrap_or(0)
}

/// Counts by queue and status, and the oldest ready request of each queue
/// (a delayed one is not ready).
pub async fn queue_stats_counts_by_status(store: &dyn Store) {
    let t0 = base();
    // One of each status in q1, made one after another so claims take the
    // one just submitted.
    submit_to(store, "q1", t0).await;
    claim(store, "q1", WORKER, 1, secs(300), t0).await;
    let r = running_in(store, "q1", at(t0, 1)).await;
    settle(store, &r.id, &token(&r), completion("1"), at(t0, 2))
        .await
        .expect("complete");
    let r = running_in(store, "q1", at(t0, 3)).await;
    settle(store, &r.id, &token(&r), failure(false), at(t0, 4))
        .await
        .expect("fail");
    let r = submit_to(store, "q1", at(t0, 5)).await;
    store
        .request_cancel(RequestRef::any(&r.id), at(t0, 6))
        .await
        .expect("cancel");
    let mut new = new_request("q1");
    new.timeout = Some(secs(1));
    submit(store, new, at(t0, 7)).await;
    assert_eq!(
        store
            .deadline_expire_due(at(t0, 1_007), 10)
            .await
            .expect("sweep")
            .len(),
        1
    );

    let mut new = new_request("q1");
    new.delay = Some(secs(3_600));
    submit(store, new, at(t0, 2_000)).await;
    submit_to(store, "q1", at(t0, 2_001)).await;
    submit_to(store, "q2", at(t0, 2_002)).await;
    running_in(store, "q3", at(t0, 2_003)).await;

    let stats = store.queue_stats(at(t0, 10_000)).await.expect("stats");
    let find = |name: &str| -> &QueueCounts {
        let found: Vec<&QueueCounts> = stats.iter().filter(|q| q.queue == name).collect();
        assert_eq!(found.len(), 1, "{name} is listed once in {stats:?}");
        found[0]
    };

    let q1 = find("q1");
    let by_status: Vec<u64> = Status::ALL.iter().map(|s| count(q1, *s)).collect();
    // queued, running, succeeded, failed, cancelled, expired
    assert_eq!(by_status, [2, 1, 1, 1, 1, 1], "q1: {q1:?}");
    assert_eq!(
        q1.oldest_ready,
        Some(at(t0, 2_001)),
        "the delayed request is not ready"
    );

    let q2 = find("q2");
    assert_eq!(
        Status::ALL
            .iter()
            .map(|s| count(q2, *s))
            .collect::<Vec<_>>(),
        [1, 0, 0, 0, 0, 0]
    );
    assert_eq!(q2.oldest_ready, Some(at(t0, 2_002)));

    let q3 = find("q3");
    assert_eq!(
        Status::ALL
            .iter()
            .map(|s| count(q3, *s))
            .collect::<Vec<_>>(),
        [0, 1, 0, 0, 0, 0]
    );
    assert_eq!(q3.oldest_ready, None, "nothing is ready in q3");
}

/// The earliest lease expiry, deadline and future `run_after`, over the
/// requests they still matter for.
pub async fn due_times_report_the_earliest_lease_deadline_and_run_after(store: &dyn Store) {
    let t0 = base();
    assert_eq!(
        store.due_times(t0).await.expect("due"),
        DueTimes::default(),
        "an empty store has nothing due"
    );

    let mut new = new_request("qa");
    new.delay = Some(secs(120));
    new.timeout = Some(secs(600));
    let a = submit(store, new, t0).await;
    let mut new = new_request("qa");
    new.delay = Some(secs(60));
    submit(store, new, t0).await;
    let mut new = new_request("qc");
    new.timeout = Some(secs(300));
    submit(store, new, t0).await;
    let c = claim(store, "qc", WORKER, 1, secs(30), t0)
        .await
        .pop()
        .expect("c");
    submit_to(store, "qd", t0).await;
    claim(store, "qd", WORKER, 1, secs(90), t0)
        .await
        .pop()
        .expect("d");

    let due = store.due_times(at(t0, 1_000)).await.expect("due");
    let want = DueTimes {
        lease_expiry: Some(at(t0, 30_000)),
        deadline: Some(at(t0, 300_000)),
        run_after: Some(at(t0, 60_000)),
        channel_visible: None,
        webhook: None,
    };
    assert_eq!(due, want);

    // c finishes: its lease and its deadline no longer count.
    settle(store, &c.id, &token(&c), completion("1"), at(t0, 2_000))
        .await
        .expect("complete");
    let due = store.due_times(at(t0, 2_000)).await.expect("due");
    let want = DueTimes {
        lease_expiry: Some(at(t0, 90_000)),
        deadline: Some(at(t0, 600_000)),
        run_after: Some(at(t0, 60_000)),
        channel_visible: None,
        webhook: None,
    };
    assert_eq!(due, want);

    // At b's run_after it is ready, no longer in the future.
    let due = store.due_times(at(t0, 60_000)).await.expect("due");
    assert_eq!(due.run_after, Some(at(t0, 120_000)));

    // a is cancelled: neither its deadline nor its run_after count.
    store
        .request_cancel(
            RequestRef {
                id: a.id.clone(),
                tenant: Some(TENANT.into()),
            },
            at(t0, 61_000),
        )
        .await
        .expect("cancel");
    let due = store.due_times(at(t0, 61_000)).await.expect("due");
    assert_eq!(
        due,
        DueTimes {
            lease_expiry: Some(at(t0, 90_000)),
            deadline: None,
            run_after: None,
            channel_visible: None,
            webhook: None,
        }
    );
}
