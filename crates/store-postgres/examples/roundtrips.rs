//! Measures the store alone (no HTTP): echo round trips — submit, claim,
//! complete — per second on PostgreSQL, in a fresh schema of the test
//! database (`COATCHECK_TEST_POSTGRES`).
//!
//! ```sh
//! cargo run --release -p coatcheck-store-postgres --example roundtrips -- [clients] [seconds] [claim_max]
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coatcheck_core::clock::truncate;
use coatcheck_store::{ClaimParams, SettleParams, Settlement, Store, StoreOptions, SubmitParams};
use coatcheck_store_postgres::testing::TestSchema;
use coatcheck_store_postgres::PgStore;
use serde_json::value::RawValue;

fn now() -> coatcheck_core::Ts {
    truncate(chrono::Utc::now())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let clients: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(16);
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let claim_max: u32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
    let schema = TestSchema::create().await;
    let store: Arc<dyn Store> = Arc::new(
        PgStore::open(
            &schema.url_with(
                &std::env::var("ROUNDTRIPS_URL_EXTRA").unwrap_or_else(|_| "pool_size=16".into()),
            ),
            StoreOptions::default(),
        )
        .await
        .expect("open"),
    );

    // One round trip at a time: latency.
    let mut lat = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        round_trip(&*store, "lat").await;
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "sequential round trip (submit, claim, complete): p50 {:?}, p99 {:?}",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );

    // Many at once: throughput. Clients submit; workers claim in batches
    // and complete each batch in one settlement.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let claim_us = Arc::new(AtomicU64::new(0));
    let settle_us = Arc::new(AtomicU64::new(0));
    let claims = Arc::new(AtomicU64::new(0));
    let submitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (store, stop, submitted) = (store.clone(), stop.clone(), submitted.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Keep the backlog bounded so we measure round trips.
                store
                    .request_submit(submit_params("tp"))
                    .await
                    .expect("submit");
                submitted.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let workers = if std::env::var("ROUNDTRIPS_SUBMIT_ONLY").is_ok() {
        0
    } else {
        (clients / 2).max(1)
    };
    for w in 0..workers {
        let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
        let (claim_us, settle_us, claims) = (claim_us.clone(), settle_us.clone(), claims.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let got = store
                    .request_claim(ClaimParams {
                        fairness: Default::default(),
                        queue: "tp".into(),
                        worker_id: format!("w{w}"),
                        max: claim_max,
                        lease: Duration::from_secs(60),
                        now: now(),
                    })
                    .await
                    .expect("claim");
                claim_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                claims.fetch_add(1, Ordering::Relaxed);
                if got.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                let t = Instant::now();
                let items = got
                    .iter()
                    .map(|r| SettleParams {
                        id: r.id.clone(),
                        queue: None,
                        lease_token: r.lease.as_ref().unwrap().token.clone(),
                        settlement: Settlement::Complete {
                            output: RawValue::from_string("{\"echo\":true}".into()).unwrap(),
                        },
                    })
                    .collect();
                let n = store
                    .request_settle_many(items, now())
                    .await
                    .expect("settle")
                    .into_iter()
                    .filter(|r| r.is_ok())
                    .count();
                settle_us.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                done.fetch_add(n as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (d0, s0, t0) = (
        done.load(Ordering::Relaxed),
        submitted.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (d1, s1, el) = (
        done.load(Ordering::Relaxed),
        submitted.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    println!(
        "{clients} submitters, {} workers (claim max {claim_max}): {:.0} submits/s, {:.0} completed round trips/s",
        workers,
        (s1 - s0) as f64 / el,
        (d1 - d0) as f64 / el
    );
    let c = claims.load(Ordering::Relaxed).max(1);
    println!(
        "claims: {c}, mean claim {} us, mean settlement {} us, mean batch {:.1}",
        claim_us.load(Ordering::Relaxed) / c,
        settle_us.load(Ordering::Relaxed) / c,
        done.load(Ordering::Relaxed) as f64 / c as f64
    );
    store.store_close().await;
    if std::env::var("ROUNDTRIPS_KEEP").is_ok() {
        println!("kept schema {}", schema.name());
        std::mem::forget(schema);
    }
}

fn submit_params(queue: &str) -> SubmitParams {
    let mut new = coatcheck_store::conformance::new_request(queue);
    new.input = RawValue::from_string("{\"n\":1}".into()).unwrap();
    SubmitParams {
        new,
        idempotency: None,
        now: now(),
    }
}

async fn round_trip(store: &dyn Store, queue: &str) {
    store
        .request_submit(submit_params(queue))
        .await
        .expect("submit");
    let got = store
        .request_claim(ClaimParams {
            fairness: Default::default(),
            queue: queue.into(),
            worker_id: "w".into(),
            max: 1,
            lease: Duration::from_secs(60),
            now: now(),
        })
        .await
        .expect("claim");
    let r = &got[0];
    store
        .request_settle_many(
            vec![SettleParams {
                id: r.id.clone(),
                queue: None,
                lease_token: r.lease.as_ref().unwrap().token.clone(),
                settlement: Settlement::Complete {
                    output: RawValue::from_string("1".into()).unwrap(),
                },
            }],
            now(),
        )
        .await
        .expect("settle");
}
