//! The shared store conformance suite, run against the embedded store: each
//! case on a fresh store in its own temp dir.

use std::sync::Arc;

use coatcheck_store::conformance::Fixture;
use coatcheck_store::StoreOptions;
use coatcheck_store_sqlite::SqliteStore;

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path(), StoreOptions::default()).expect("open the store");
    Fixture {
        store: Arc::new(store),
        guard: Box::new(dir),
    }
}

coatcheck_store::conformance_suite!(fixture);

/// A secret is persisted: the same bytes after the store is closed and
/// opened again on the same directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_survives_a_reopen() {
    use coatcheck_store::Store;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path(), StoreOptions::default()).expect("open");
    let first = store.store_secret("page-token").await.expect("secret");
    store.store_close().await;
    drop(store);
    let store = SqliteStore::open(dir.path(), StoreOptions::default()).expect("reopen");
    assert_eq!(
        store.store_secret("page-token").await.expect("secret"),
        first
    );
    store.store_close().await;
}

/// Under steady writes the WAL does not grow without end: checkpoints run
/// beside the writer, and the writer's short catch-up checkpoint lets the
/// WAL start over. (Without the catch-up, this workload — well over 100 MB
/// of WAL frames — left a WAL of that size.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_under_steady_writes() {
    use coatcheck_store::conformance::workload::echo_rounds;
    use coatcheck_store::Store;
    use serde_json::value::RawValue;

    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path(), StoreOptions::default()).expect("open");
    let wal = dir.path().join("coatcheck.db-wal");
    let body = "x".repeat(8192);
    let input = |_| RawValue::from_string(format!(r#"{{"body":"{body}"}}"#)).expect("json");
    let (rounds, per_round) = (400, 16);
    let mut largest = 0u64;
    echo_rounds(&store, "wal", rounds, per_round, input, || {
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    })
    .await;
    let db = std::fs::metadata(dir.path().join("coatcheck.db"))
        .expect("db")
        .len();
    // Every request's input and output alone are 16 KiB: the WAL saw far more.
    let written_at_least = (rounds * per_round * 2 * 8192) as u64;
    assert!(written_at_least > 3 * 32 * 1024 * 1024);
    assert!(
        largest < 32 * 1024 * 1024,
        "the WAL reached {largest} bytes (database {db} bytes)"
    );
    store.store_close().await;
}

/// Submits `n` requests to `queue` and claims them all (a 60 s lease).
async fn submitted_and_claimed(
    store: &SqliteStore,
    queue: &str,
    n: u32,
) -> Vec<coatcheck_core::Request> {
    use coatcheck_store::{ClaimParams, FairnessRules, Store, SubmitParams};
    let now = chrono::Utc::now;
    for _ in 0..n {
        store
            .request_submit(SubmitParams {
                new: coatcheck_store::conformance::new_request(queue),
                idempotency: None,
                now: now(),
            })
            .await
            .expect("submit");
    }
    let claimed = store
        .request_claim(ClaimParams {
            queue: queue.into(),
            worker_id: "w".into(),
            max: n,
            lease: std::time::Duration::from_secs(60),
            fairness: Arc::new(FairnessRules::default()),
            now: now(),
        })
        .await
        .expect("claim");
    assert_eq!(claimed.len(), n as usize);
    claimed
}

/// The writer keeps the unfinished requests it wrote last, so a claim or a
/// settlement need not read them back. A change that is rolled back must
/// not survive in that copy: here a heartbeat's progress is written and
/// then refused (a trigger fails its history row), and the next write to
/// the request must start from what is stored, without that progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_rolled_back_is_not_remembered_by_the_writer() {
    let now = chrono::Utc::now;
    use coatcheck_store::{HeartbeatParams, RequestRef, SettleParams, Settlement, Store};
    use serde_json::value::RawValue;

    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path(), StoreOptions::default()).expect("open");
    let claimed = submitted_and_claimed(&store, "recent", 1).await;
    let id = claimed[0].id.clone();
    let token = claimed[0].lease.as_ref().expect("leased").token.clone();

    let side =
        rusqlite::Connection::open(dir.path().join("coatcheck.db")).expect("side connection");
    side.execute_batch(
        "CREATE TRIGGER refuse_progress BEFORE INSERT ON history \
         WHEN json_extract(NEW.event, '$.kind') = 'progress' \
         BEGIN SELECT RAISE(ABORT, 'progress refused'); END;",
    )
    .expect("trigger");
    let beat = |progress: Option<&str>| HeartbeatParams {
        id: id.clone(),
        lease_token: token.clone(),
        progress: progress.map(|p| RawValue::from_string(p.into()).expect("json")),
        extend: None,
        now: now(),
    };
    store
        .lease_heartbeat(beat(Some(r#"{"step":1}"#)))
        .await
        .expect_err("the history row is refused, so the heartbeat fails");
    side.execute_batch("DROP TRIGGER refuse_progress")
        .expect("drop trigger");

    let stored = store
        .request_get(RequestRef::any(id.clone()))
        .await
        .expect("get");
    assert!(stored.progress.is_none(), "nothing of it was stored");
    let again = store.lease_heartbeat(beat(None)).await.expect("heartbeat");
    assert!(
        again.request.progress.is_none(),
        "the next write starts from the stored row, not the rolled-back one: {:?}",
        again.request.progress
    );
    assert_eq!(again.request.history_seq, stored.history_seq);
    let done = store
        .request_settle_many(
            vec![SettleParams {
                id: id.clone(),
                queue: None,
                lease_token: token.clone(),
                settlement: Settlement::Complete {
                    output: RawValue::from_string("1".into()).expect("json"),
                },
            }],
            now(),
        )
        .await
        .expect("settle");
    let done = done.into_iter().next().expect("one").expect("settled");
    assert!(done.request.progress.is_none());
    store.store_close().await;
}

/// Queue counts follow rollbacks to a savepoint: one settlement of a batch
/// fails after writing (a trigger refuses its history row), the batch starts
/// over with a savepoint per item, and the counts show exactly the two that
/// went through — not three, and not none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_counts_follow_a_rollback_to_a_savepoint() {
    use coatcheck_core::Status;
    use coatcheck_store::{SettleParams, Settlement, Store};
    use serde_json::value::RawValue;
    let now = chrono::Utc::now;

    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path(), StoreOptions::default()).expect("open");
    let claimed = submitted_and_claimed(&store, "rolled", 3).await;
    let side =
        rusqlite::Connection::open(dir.path().join("coatcheck.db")).expect("side connection");
    side.execute_batch(&format!(
        "CREATE TRIGGER refuse_one BEFORE INSERT ON history \
         WHEN NEW.request_id = '{}' AND json_extract(NEW.event, '$.kind') = 'succeeded' \
         BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        claimed[1].id
    ))
    .expect("trigger");
    let items = claimed
        .iter()
        .map(|r| SettleParams {
            id: r.id.clone(),
            queue: None,
            lease_token: r.lease.as_ref().expect("leased").token.clone(),
            settlement: Settlement::Complete {
                output: RawValue::from_string("1".into()).expect("json"),
            },
        })
        .collect();
    let results = store
        .request_settle_many(items, now())
        .await
        .expect("the batch as a whole is answered");
    let ok: Vec<bool> = results.iter().map(|r| r.is_ok()).collect();
    assert_eq!(ok, [true, false, true]);
    let stats = store.queue_stats(now()).await.expect("stats");
    let q = stats.iter().find(|q| q.queue == "rolled").expect("listed");
    let mut counts = q.counts.clone();
    counts.sort();
    assert_eq!(counts, vec![(Status::Running, 1), (Status::Succeeded, 2)]);
    store.store_close().await;
}

/// Claims parked in the writer (`request_claim_parked`): the embedded store
/// hands work to them in the transaction that makes it claimable.
mod parked {
    use coatcheck_store::conformance::{parked, run};

    macro_rules! parked_cases {
        ($($case:ident),* $(,)?) => {$(
            #[test]
            fn $case() {
                run(async {
                    let f = super::fixture().await;
                    parked::$case(&*f.store).await;
                    f.store.store_close().await;
                });
            }
        )*};
    }

    parked_cases!(
        a_parked_claim_is_handed_the_next_submit,
        an_unparked_claim_answers_empty_and_takes_nothing,
        an_abandoned_parked_claim_takes_nothing,
        parked_claims_are_served_oldest_first,
        a_poke_hands_over_a_delayed_request_once_due,
        a_redriven_request_is_handed_to_a_parked_claim,
        a_fallback_request_is_handed_to_a_parked_claim,
        work_freed_in_the_parking_batch_is_handed_over,
    );
}

/// A store of the previous schema version (no queue counts yet) gets them
/// counted from the requests already there when it is opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_counts_the_requests_already_there() {
    use coatcheck_core::clock::truncate;
    use coatcheck_core::Status;
    use coatcheck_store::{Store, SubmitParams};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path(), StoreOptions::default()).expect("open");
    for _ in 0..4 {
        store
            .request_submit(SubmitParams {
                new: coatcheck_store::conformance::new_request("old"),
                idempotency: None,
                now: truncate(chrono::Utc::now()),
            })
            .await
            .expect("submit");
    }
    store.store_close().await;
    drop(store);
    // As a database of the previous version was.
    let conn = rusqlite::Connection::open(dir.path().join("coatcheck.db")).expect("db");
    conn.execute_batch("DROP TABLE queue_counts; PRAGMA user_version = 5;")
        .expect("back to version 5");
    drop(conn);
    let store = SqliteStore::open(dir.path(), StoreOptions::default()).expect("reopen");
    let stats = store
        .queue_stats(truncate(chrono::Utc::now()))
        .await
        .expect("stats");
    let old = stats.iter().find(|q| q.queue == "old").expect("listed");
    assert_eq!(old.counts, vec![(Status::Queued, 4)]);
    store.store_close().await;
}

/// How many times the store has flushed its WAL so far.
fn flushes(store: &SqliteStore) -> u64 {
    coatcheck_store::Store::flushes(store).expect("the embedded store counts its flushes")
}

/// A submit answered before its flush (`request_submit_unsynced`: a
/// `Prefer: wait` submit) costs no fsync of its own — the completion's
/// flush covers it, and `sync_through` then needs none — while a mark that
/// no flush covered yet gets one on demand. A plain submit is flushed before
/// it answers. (Fails if unsynced submits flush, or if `sync_through` returns
/// without a flush that covers the mark.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsynced_submit_is_covered_by_the_next_flush_or_on_demand() {
    use coatcheck_store::{ClaimParams, SettleParams, Settlement, Store, SubmitParams, Submitted};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path(), StoreOptions::default()).expect("open");
    let submit = |queue: &str| SubmitParams {
        new: coatcheck_store::conformance::new_request(queue),
        idempotency: None,
        now: chrono::Utc::now(),
    };

    let before = flushes(&store);
    store.request_submit(submit("plain")).await.expect("submit");
    assert_eq!(
        flushes(&store),
        before + 1,
        "a plain submit is flushed before it answers"
    );

    let before = flushes(&store);
    let (created, mark) = store
        .request_submit_unsynced(submit("waits"))
        .await
        .expect("unsynced submit");
    let mark = mark.expect("answered before any flush covered it");
    assert!(matches!(created, Submitted::Created(_)));
    assert_eq!(flushes(&store), before, "no flush of its own");
    let claimed = store
        .request_claim(ClaimParams {
            queue: "waits".into(),
            worker_id: "w".into(),
            max: 1,
            lease: std::time::Duration::from_secs(60),
            fairness: Default::default(),
            now: chrono::Utc::now(),
        })
        .await
        .expect("claim");
    assert_eq!(flushes(&store), before, "a claim is not flushed");
    let r = &claimed[0];
    let settled = store
        .request_settle_many(
            vec![SettleParams {
                id: r.id.clone(),
                queue: None,
                lease_token: r.lease.as_ref().expect("leased").token.clone(),
                settlement: Settlement::Complete {
                    output: r.input.clone(),
                },
            }],
            chrono::Utc::now(),
        )
        .await
        .expect("settle");
    settled
        .into_iter()
        .for_each(|s| drop(s.expect("completed")));
    assert_eq!(flushes(&store), before + 1, "the completion is flushed");
    store.sync_through(mark).await.expect("covered");
    assert_eq!(
        flushes(&store),
        before + 1,
        "the completion's flush covered the submit"
    );

    let (_, mark) = store
        .request_submit_unsynced(submit("waits"))
        .await
        .expect("unsynced submit");
    let mark = mark.expect("answered before any flush covered it");
    let before = flushes(&store);
    store.sync_through(mark).await.expect("flushed on demand");
    assert_eq!(flushes(&store), before + 1, "one flush on demand");
    store.sync_through(mark).await.expect("covered");
    assert_eq!(flushes(&store), before + 1, "and none the second time");
    store.store_close().await;
}

/// An expiry sweep that finds nothing due writes nothing and costs no flush
/// (the lease reaper and the deadline expirer wake early, and the first
/// lease after a quiet spell wakes the reaper); one that expires something
/// is flushed before it answers. (Fails if empty sweeps flush, or if a
/// sweep that changed something does not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_sweep_that_finds_nothing_is_not_flushed() {
    use coatcheck_store::{ClaimParams, Store, SubmitParams};
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path(), StoreOptions::default()).expect("open");
    let now = chrono::Utc::now();
    let later = |secs: i64| now + chrono::Duration::seconds(secs);
    let mut leased = coatcheck_store::conformance::new_request("sweeps");
    leased.timeout = Some(Duration::from_secs(60));
    store
        .request_submit(SubmitParams {
            new: leased,
            idempotency: None,
            now,
        })
        .await
        .expect("submit");
    let claimed = store
        .request_claim(ClaimParams {
            queue: "sweeps".into(),
            worker_id: "w".into(),
            max: 1,
            lease: Duration::from_secs(10),
            fairness: Default::default(),
            now,
        })
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);

    let before = flushes(&store);
    let none = store.lease_expire_due(later(5), 10).await.expect("sweep");
    assert!(none.is_empty(), "{none:?}");
    let none = store
        .deadline_expire_due(later(5), 10)
        .await
        .expect("sweep");
    assert!(none.is_empty(), "{none:?}");
    assert_eq!(
        flushes(&store),
        before,
        "sweeps that found nothing are not flushed"
    );

    let requeued = store.lease_expire_due(later(11), 10).await.expect("sweep");
    assert_eq!(requeued.len(), 1, "the lease ran out");
    assert_eq!(
        flushes(&store),
        before + 1,
        "a sweep that changed something is flushed"
    );
    let expired = store
        .deadline_expire_due(later(61), 10)
        .await
        .expect("sweep");
    assert_eq!(expired.len(), 1, "the deadline passed");
    assert_eq!(flushes(&store), before + 2, "and so is this one");
    store.store_close().await;
}
