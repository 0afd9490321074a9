//! The hot path of the embedded store, for the CI regression guard
//! (`scripts/perf-guard.sh` counts its instructions under callgrind):
//! submit → claim → complete for a fixed number of requests, in batches as
//! the server would see them under load. Deterministic work, no timing.

use coatcheck_store::conformance::workload::echo_rounds;
use coatcheck_store::{Store, StoreOptions};
use coatcheck_store_sqlite::SqliteStore;
use serde_json::value::RawValue;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = SqliteStore::open(dir.path(), StoreOptions::default()).expect("open");
        let body = "x".repeat(64);
        let input = |id: usize| {
            RawValue::from_string(format!(
                r#"{{"id":{id},"client":"bench","ts":0,"body":"{body}"}}"#
            ))
            .expect("json")
        };
        echo_rounds(&store, "hot", n / 16, 16, input, || {}).await;
        store.store_close().await;
    });
}
