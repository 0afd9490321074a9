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
