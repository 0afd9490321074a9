//! The hot path of the embedded store, for the CI regression guard
//! (`scripts/perf-guard.sh` counts its instructions under callgrind):
//! submit → claim → complete for a fixed number of requests, in batches as
//! the server would see them under load. Deterministic work, no timing.

use std::sync::Arc;
use std::time::Duration;

use coatcheck_core::rules::NewRequest;
use coatcheck_core::{Clock, SystemClock};
use coatcheck_store::{ClaimParams, SettleParams, Settlement, Store, StoreOptions, SubmitParams};
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
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path(), StoreOptions::default()).expect("open"));
        let clock = SystemClock;
        let body = "x".repeat(64);
        for chunk in 0..n / 16 {
            let mut submits = Vec::new();
            for i in 0..16 {
                let id = chunk * 16 + i;
                let input = RawValue::from_string(format!(
                    r#"{{"id":{id},"client":"bench","ts":0,"body":"{body}"}}"#
                ))
                .expect("json");
                let new = NewRequest {
                    id: coatcheck_core::model::new_request_id(),
                    tenant: "t".into(),
                    queue: "hot".into(),
                    input,
                    correlation_id: None,
                    priority: 0,
                    delay: None,
                    timeout: None,
                    max_attempts: 3,
                    reply_to: None,
                    metadata: Default::default(),
                    fallback_queue: None,
                    fallback_of: None,
                    fairness_key: None,
                };
                submits.push(store.request_submit(SubmitParams {
                    new,
                    idempotency: None,
                    now: clock.now(),
                }));
            }
            futures::future::try_join_all(submits)
                .await
                .expect("submit");
            let claimed = store
                .request_claim(ClaimParams {
                    queue: "hot".into(),
                    worker_id: "w".into(),
                    max: 16,
                    lease: Duration::from_secs(30),
                    fairness: Default::default(),
                    now: clock.now(),
                })
                .await
                .expect("claim");
            assert_eq!(claimed.len(), 16);
            let items = claimed
                .into_iter()
                .map(|r| SettleParams {
                    id: r.id.clone(),
                    queue: None,
                    lease_token: r.lease.expect("leased").token,
                    settlement: Settlement::Complete { output: r.input },
                })
                .collect();
            for res in store
                .request_settle_many(items, clock.now())
                .await
                .expect("settle")
            {
                res.expect("completed");
            }
        }
        store.store_close().await;
    });
}
