//! Measures the store alone (no HTTP): echo round trips — submit, claim,
//! complete — per second on PostgreSQL, in a fresh schema of the test
//! database (`COATCHECK_TEST_POSTGRES`).
//!
//! ```sh
//! cargo run --release -p coatcheck-store-postgres --example roundtrips -- [clients] [seconds] [claim_max]
//! ```
//!
//! It prints the latency of one round trip at a time (and the database's
//! CPU time per step, from `/proc`: meaningful only where nothing else uses
//! the server), then the throughput of `clients` submitters and
//! `clients / 2` workers claiming up to `claim_max` and completing each
//! batch in one settlement. `ROUNDTRIPS_URL_EXTRA` adds URL parameters
//! (default `pool_size=16`), `ROUNDTRIPS_SUBMIT_ONLY` runs no workers,
//! `ROUNDTRIPS_KEEP` keeps the schema for a look afterwards.

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

    // One round trip at a time: latency, and the database's CPU time per
    // step (all postgres processes of this machine, read from /proc: run it
    // where nothing else uses the server).
    let mut lat = Vec::new();
    let (mut submit_cpu, mut claim_cpu, mut settle_cpu) = (0u64, 0u64, 0u64);
    const N: usize = 1000;
    for _ in 0..N {
        let t = Instant::now();
        let c0 = pg_cpu_ticks();
        store
            .request_submit(submit_params("lat"))
            .await
            .expect("submit");
        let c1 = pg_cpu_ticks();
        let got = store
            .request_claim(claim_params("lat", 1))
            .await
            .expect("claim");
        let c2 = pg_cpu_ticks();
        store
            .request_settle_many(completions(&got), now())
            .await
            .expect("settle");
        let c3 = pg_cpu_ticks();
        lat.push(t.elapsed());
        submit_cpu += c1 - c0;
        claim_cpu += c2 - c1;
        settle_cpu += c3 - c2;
    }
    lat.sort();
    let ms = |ticks: u64| ticks as f64 * 10.0 / N as f64; // 100 ticks a second
    println!(
        "sequential round trip (submit, claim, complete): p50 {:?}, p99 {:?}; \
         database CPU per step: submit {:.2} ms, claim {:.2} ms, complete {:.2} ms",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        ms(submit_cpu),
        ms(claim_cpu),
        ms(settle_cpu),
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

/// CPU time (user + system, in clock ticks) of every postgres process.
fn pg_cpu_ticks() -> u64 {
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((name, rest)) = stat.split_once(") ") else {
            continue;
        };
        if !name.ends_with("(postgres") {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After "pid (comm) ": state is field 3, utime 14, stime 15.
        let t = |i: usize| {
            f.get(i - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        total += t(14) + t(15);
    }
    total
}

fn claim_params(queue: &str, max: u32) -> ClaimParams {
    ClaimParams {
        fairness: Default::default(),
        queue: queue.into(),
        worker_id: "w".into(),
        max,
        lease: Duration::from_secs(60),
        now: now(),
    }
}

fn completions(got: &[coatcheck_core::Request]) -> Vec<SettleParams> {
    got.iter()
        .map(|r| SettleParams {
            id: r.id.clone(),
            queue: None,
            lease_token: r.lease.as_ref().unwrap().token.clone(),
            settlement: Settlement::Complete {
                output: RawValue::from_string("{\"echo\":true}".into()).unwrap(),
            },
        })
        .collect()
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
