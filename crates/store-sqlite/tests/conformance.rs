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
