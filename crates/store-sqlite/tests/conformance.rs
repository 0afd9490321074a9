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
