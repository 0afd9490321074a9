//! `queue_stats` and `due_times`: what operators and background tasks read.

use coatcheck_core::Status;

use super::support::*;
use super::{new_request, TENANT};
use crate::{DueTimes, ListParams, QueueCounts, RequestRef, Store};

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

/// What `queue_stats` counts must equal, read the slow way: every request,
/// grouped by queue and status.
async fn counted_the_slow_way(store: &dyn Store) -> Vec<(String, Status, u64)> {
    let mut all = Vec::new();
    let mut before_id = None;
    loop {
        let page = store
            .request_list(ListParams {
                tenant: None,
                queue: None,
                status: None,
                correlation_id: None,
                before_id: before_id.clone(),
                limit: 500,
            })
            .await
            .expect("list");
        let Some(last) = page.last() else { break };
        before_id = Some(last.id.clone());
        all.extend(page);
    }
    let mut out: Vec<(String, Status, u64)> = Vec::new();
    for r in all {
        match out
            .iter_mut()
            .find(|(q, s, _)| *q == r.queue && *s == r.status)
        {
            Some((_, _, n)) => *n += 1,
            None => out.push((r.queue.clone(), r.status, 1)),
        }
    }
    out.sort();
    out
}

/// `queue_stats`, flattened the same way (zero counts left out).
async fn counted_by_stats(
    store: &dyn Store,
    now: coatcheck_core::Ts,
) -> Vec<(String, Status, u64)> {
    let mut out: Vec<(String, Status, u64)> = Vec::new();
    for q in store.queue_stats(now).await.expect("stats") {
        for s in Status::ALL {
            let n = count(&q, s);
            if n > 0 {
                out.push((q.queue.clone(), s, n));
            }
        }
    }
    out.sort();
    out
}

/// Counts kept by the store (not counted at read time) stay equal to the
/// requests themselves through every kind of change: submits, claims,
/// completes, retries, dead letters and their fallbacks, cancels, lease
/// and deadline expiry, redrives, refused calls and retention.
pub async fn queue_counts_match_the_requests_through_every_change(store: &dyn Store) {
    let t0 = base();
    let check = |step: &'static str, now| async move {
        assert_eq!(
            counted_by_stats(store, now).await,
            counted_the_slow_way(store).await,
            "after {step}"
        );
    };
    for i in 0..6 {
        submit_to(store, "cq-a", at(t0, i)).await;
    }
    for i in 0..3 {
        submit_to(store, "cq-b", at(t0, 10 + i)).await;
    }
    let mut fb = new_request("cq-a");
    fb.max_attempts = 1;
    fb.fallback_queue = Some("cq-fallback".into());
    let fb = submit(store, fb, at(t0, 20)).await;
    let mut doomed = new_request("cq-b");
    doomed.timeout = Some(secs(1));
    submit(store, doomed, at(t0, 21)).await;
    check("submits", at(t0, 30)).await;

    let claimed = claim(store, "cq-a", WORKER, 7, secs(1), at(t0, 40)).await;
    assert_eq!(claimed.len(), 7);
    check("claims", at(t0, 41)).await;

    // Complete two, fail one for good (the fallback request goes to its
    // dead-letter set and spawns a request in cq-fallback), retry one.
    let mut rest = claimed.iter();
    for r in rest.by_ref().take(2) {
        settle(store, &r.id, &token(r), completion("1"), at(t0, 50))
            .await
            .expect("complete");
    }
    settle(
        store,
        &fb.id,
        &token(claimed.iter().find(|r| r.id == fb.id).expect("fb claimed")),
        failure(false),
        at(t0, 51),
    )
    .await
    .expect("fail for good");
    let retried = rest.find(|r| r.id != fb.id).expect("one more");
    settle(
        store,
        &retried.id,
        &token(retried),
        failure(true),
        at(t0, 52),
    )
    .await
    .expect("fail, retryable");
    // Refused: a stale token changes nothing, counts included.
    assert!(settle(
        store,
        &retried.id,
        &token(retried),
        completion("2"),
        at(t0, 53)
    )
    .await
    .is_err());
    check("settlements", at(t0, 60)).await;

    // Cancel a queued one; expire the deadline of another; let the leases
    // of the ones still running run out.
    let queued = submit_to(store, "cq-b", at(t0, 70)).await;
    store
        .request_cancel(RequestRef::any(&queued.id), at(t0, 71))
        .await
        .expect("cancel");
    store
        .deadline_expire_due(at(t0, 5_000), 100)
        .await
        .expect("deadlines");
    store
        .lease_expire_due(at(t0, 5_000), 100)
        .await
        .expect("leases");
    check("cancel and sweeps", at(t0, 5_001)).await;

    // Redrive the dead letter; purge what finished before 55 ms.
    store
        .dead_letter_redrive(RequestRef::any(&fb.id), at(t0, 6_000))
        .await
        .expect("redrive");
    check("redrive", at(t0, 6_001)).await;
    let purged = store.request_purge(at(t0, 55), 100).await.expect("purge");
    assert!(
        purged >= 2,
        "the two completed requests are purged ({purged})"
    );
    check("retention", at(t0, 6_002)).await;
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
