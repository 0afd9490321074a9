//! The shared store conformance suite, run against PostgreSQL: each case on
//! a fresh, empty schema of the test database (`COATCHECK_TEST_POSTGRES`,
//! default `postgres://postgres@127.0.0.1:5432/test`), dropped afterwards.

use std::sync::Arc;

use coatcheck_store::conformance::Fixture;
use coatcheck_store::StoreOptions;
use coatcheck_store_postgres::testing::TestSchema;
use coatcheck_store_postgres::PgStore;

async fn fixture() -> Fixture {
    let schema = TestSchema::create().await;
    let store = PgStore::open(&schema.url_with("pool_size=4"), StoreOptions::default())
        .await
        .expect("open the store");
    Fixture {
        store: Arc::new(store),
        guard: Box::new(schema),
    }
}

coatcheck_store::conformance_suite!(fixture);

/// What only a store shared by many processes has: other nodes' changes,
/// reconnects, migrations racing, retention.
mod shared {
    use std::time::{Duration, Instant};

    use coatcheck_core::clock::{add, truncate};
    use coatcheck_core::model::new_request_id;
    use coatcheck_core::rules::NewRequest;
    use coatcheck_core::Status;
    use coatcheck_store::{
        ClaimParams, RemoteChange, RequestRef, SettleParams, Settlement, Store, StoreError,
        StoreOptions, SubmitParams, Submitted,
    };
    use coatcheck_store_postgres::testing::{Proxy, TestSchema};
    use coatcheck_store_postgres::PgStore;
    use serde_json::value::RawValue;
    use tokio::sync::broadcast;

    async fn open(url: &str) -> PgStore {
        PgStore::open(url, StoreOptions::default())
            .await
            .expect("open the store")
    }

    fn new(queue: &str) -> NewRequest {
        let mut n = coatcheck_store::conformance::new_request(queue);
        n.id = new_request_id();
        n
    }

    async fn submit(store: &dyn Store, queue: &str) -> String {
        let p = SubmitParams {
            new: new(queue),
            idempotency: None,
            now: truncate(chrono::Utc::now()),
        };
        match store.request_submit(p).await.expect("submit") {
            Submitted::Created(r) => r.id,
            Submitted::Replayed(r) => panic!("replayed {}", r.id),
        }
    }

    /// The next change about `id` (skipping others), within `within`.
    async fn change_of(
        rx: &mut broadcast::Receiver<RemoteChange>,
        id: &str,
        within: Duration,
    ) -> Option<RemoteChange> {
        tokio::time::timeout(within, async {
            loop {
                match rx.recv().await {
                    Ok(c @ RemoteChange::Request { .. }) => {
                        if matches!(&c, RemoteChange::Request { id: got, .. } if got == id) {
                            return c;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => panic!("feed: {e}"),
                }
            }
        })
        .await
        .ok()
    }

    /// The database ended the pooled connection's session, and the pool
    /// hands it out before noticing: every kind of read still answers (on a
    /// fresh connection) instead of a `503`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_on_a_connection_the_database_ended_unnoticed_answers() {
        let schema = TestSchema::create().await;
        let proxy = Proxy::start().await;
        // One pooled connection: each read gets the one that was ended.
        let store = open(&schema.url_via(proxy.addr(), "pool_size=1")).await;
        let id = submit(&store, "stale").await;
        let now = || truncate(chrono::Utc::now());

        proxy.close_unnoticed().await;
        let got = store.request_get(RequestRef::any(&id)).await;
        assert_eq!(got.expect("get").id, id);
        proxy.close_unnoticed().await;
        let events = store.request_history(RequestRef::any(&id), 0).await;
        assert!(!events.expect("history").is_empty());
        proxy.close_unnoticed().await;
        let listed = store
            .request_list(coatcheck_store::ListParams {
                queue: Some("stale".into()),
                limit: 10,
                ..Default::default()
            })
            .await;
        assert_eq!(listed.expect("list").len(), 1);
        proxy.close_unnoticed().await;
        let stats = store.queue_stats(now()).await.expect("stats");
        assert!(stats.iter().any(|q| q.queue == "stale"));
        proxy.close_unnoticed().await;
        store.due_times(now()).await.expect("due times");
        proxy.close_unnoticed().await;
        assert_eq!(store.queue_depth("stale").await.expect("depth"), 1);
        store.store_close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_on_one_node_reaches_the_others_but_not_itself() {
        let schema = TestSchema::create().await;
        let a = open(&schema.url_with("pool_size=2")).await;
        let b = open(&schema.url_with("pool_size=2")).await;
        let mut at_a = a.remote_changes().expect("a feed");
        let mut at_b = b.remote_changes().expect("a feed");

        let t0 = Instant::now();
        let id = submit(&a, "remote").await;
        let got = change_of(&mut at_b, &id, Duration::from_secs(5))
            .await
            .expect("b hears of a's submit");
        let took = t0.elapsed();
        match got {
            RemoteChange::Request { queue, status, .. } => {
                assert_eq!(queue, "remote");
                assert_eq!(status, Status::Queued);
            }
            other => panic!("{other:?}"),
        }
        eprintln!("submit on a → change at b: {took:?}");

        // A claim on b carries the lease expiry to a.
        let now = truncate(chrono::Utc::now());
        let claimed = b
            .request_claim(ClaimParams {
                fairness: Default::default(),
                queue: "remote".into(),
                worker_id: "w".into(),
                max: 1,
                lease: Duration::from_secs(30),
                now,
            })
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1);
        match change_of(&mut at_a, &id, Duration::from_secs(5)).await {
            Some(RemoteChange::Request {
                status,
                lease_expires_at,
                ..
            }) => {
                assert_eq!(status, Status::Running);
                assert_eq!(lease_expires_at, Some(add(now, Duration::from_secs(30))));
            }
            other => panic!("a hears of b's claim: {other:?}"),
        }
        // Neither hears of its own changes.
        assert!(change_of(&mut at_a, &id, Duration::from_millis(300))
            .await
            .is_none());
        assert!(change_of(&mut at_b, &id, Duration::from_millis(300))
            .await
            .is_none());
        a.store_close().await;
        b.store_close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reply_appended_on_one_node_wakes_the_channel_on_the_others() {
        let schema = TestSchema::create().await;
        let a = open(&schema.url_with("pool_size=2")).await;
        let b = open(&schema.url_with("pool_size=2")).await;
        let mut at_b = b.remote_changes().expect("a feed");
        let mut n = new("replying");
        n.reply_to = Some(coatcheck_core::ReplyTo::Channel("answers".into()));
        let now = truncate(chrono::Utc::now());
        a.request_submit(SubmitParams {
            new: n,
            idempotency: None,
            now,
        })
        .await
        .expect("submit");
        let c = a
            .request_claim(ClaimParams {
                queue: "replying".into(),
                worker_id: "w".into(),
                max: 1,
                lease: Duration::from_secs(30),
                fairness: Default::default(),
                now,
            })
            .await
            .expect("claim")
            .pop()
            .expect("one");
        a.request_settle_many(
            vec![SettleParams {
                id: c.id.clone(),
                queue: None,
                lease_token: c.lease.expect("leased").token,
                settlement: Settlement::Complete {
                    output: RawValue::from_string("1".into()).unwrap(),
                },
            }],
            now,
        )
        .await
        .expect("settle");
        let woke = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match at_b.recv().await {
                    Ok(RemoteChange::Channel { tenant, channel }) => return (tenant, channel),
                    Ok(_) => {}
                    Err(e) => panic!("feed: {e}"),
                }
            }
        })
        .await
        .expect("b hears of the reply");
        assert_eq!(woke, ("t1".to_string(), "answers".to_string()));
        a.store_close().await;
        b.store_close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_listen_connection_reconnects_and_resyncs() {
        let schema = TestSchema::create().await;
        let a = open(&schema.url_with("pool_size=2")).await;
        let b = open(&schema.url_with("pool_size=2")).await;
        let mut at_b = b.remote_changes().expect("a feed");
        // Every session of the schema ends: what a database restart does.
        assert!(schema.terminate_sessions().await >= 2);
        let resync = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(RemoteChange::Resync) = at_b.recv().await {
                    return;
                }
            }
        })
        .await;
        assert!(resync.is_ok(), "b resyncs after reconnecting");
        // And hears of a's changes again (a's pool reconnects by itself;
        // its first call may still meet a dead pooled connection).
        let mut id = None;
        for _ in 0..20 {
            let p = SubmitParams {
                new: new("after"),
                idempotency: None,
                now: truncate(chrono::Utc::now()),
            };
            match a.request_submit(p).await {
                Ok(s) => {
                    id = Some(match s {
                        Submitted::Created(r) | Submitted::Replayed(r) => r.id,
                    });
                    break;
                }
                Err(StoreError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        let id = id.expect("a submits again");
        assert!(change_of(&mut at_b, &id, Duration::from_secs(10))
            .await
            .is_some());
        a.store_close().await;
        b.store_close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_database_is_unavailable_at_once_and_comes_back_by_itself() {
        let schema = TestSchema::create().await;
        let proxy = Proxy::start().await;
        let store = open(&schema.url_via(proxy.addr(), "pool_size=2")).await;
        let mut feed = store.remote_changes().expect("a feed");
        store.store_ping().await.expect("ready");
        submit(&store, "outage").await;

        proxy.down().await;
        for _ in 0..3 {
            let t0 = Instant::now();
            let res = store.store_ping().await;
            assert!(
                matches!(res, Err(StoreError::Unavailable(_))),
                "ping while down: {res:?}"
            );
            let p = SubmitParams {
                new: new("outage"),
                idempotency: None,
                now: truncate(chrono::Utc::now()),
            };
            let res = store.request_submit(p).await;
            assert!(
                matches!(res, Err(StoreError::Unavailable(_))),
                "submit while down: {res:?}"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(6),
                "bounded: {:?}",
                t0.elapsed()
            );
        }

        proxy.up();
        let t0 = Instant::now();
        while store.store_ping().await.is_err() {
            assert!(t0.elapsed() < Duration::from_secs(10), "not back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        submit(&store, "outage").await;
        // The LISTEN connection came back too, and said so.
        let resync = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(RemoteChange::Resync) = feed.recv().await {
                    return;
                }
            }
        })
        .await;
        assert!(resync.is_ok(), "a resync after the outage");
        store.store_close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_nodes_opening_at_once_migrate_once() {
        let schema = TestSchema::create().await;
        let url = schema.url_with("pool_size=1");
        let opens: Vec<_> = (0..10)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { open(&url).await })
            })
            .collect();
        let mut stores = Vec::new();
        for o in opens {
            stores.push(o.await.expect("open task"));
        }
        let (client, conn) = tokio_postgres::connect(
            &coatcheck_store_postgres::testing::base_url(),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect");
        tokio::spawn(conn);
        let q = format!(
            "SELECT version FROM \"{}\".schema_migrations ORDER BY version",
            schema.name()
        );
        let versions: Vec<i32> = client
            .query(&q, &[])
            .await
            .expect("versions")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
            .expect("migrations dir")
            .count() as i32;
        assert_eq!(
            versions,
            (1..=files).collect::<Vec<_>>(),
            "each applied once"
        );
        for s in &stores {
            s.store_close().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_deletes_finished_requests_in_bounded_batches() {
        let schema = TestSchema::create().await;
        let store = open(&schema.url_with("pool_size=2")).await;
        let t0 = truncate(chrono::Utc::now());
        let mut done = Vec::new();
        for _ in 0..5 {
            let id = submit(&store, "purge").await;
            let c = store
                .request_claim(ClaimParams {
                    fairness: Default::default(),
                    queue: "purge".into(),
                    worker_id: "w".into(),
                    max: 1,
                    lease: Duration::from_secs(30),
                    now: t0,
                })
                .await
                .expect("claim")
                .pop()
                .expect("one");
            let token = c.lease.expect("leased").token;
            store
                .request_settle_many(
                    vec![SettleParams {
                        id: id.clone(),
                        queue: None,
                        lease_token: token,
                        settlement: Settlement::Complete {
                            output: RawValue::from_string("1".into()).unwrap(),
                        },
                    }],
                    t0,
                )
                .await
                .expect("settle")
                .pop()
                .expect("one")
                .expect("complete");
            done.push(id);
        }
        let live = submit(&store, "purge").await;
        let later = add(t0, Duration::from_secs(1));
        assert_eq!(store.request_purge(later, 3).await.expect("purge"), 3);
        assert_eq!(store.request_purge(later, 3).await.expect("purge"), 2);
        assert_eq!(store.request_purge(later, 3).await.expect("purge"), 0);
        for id in &done {
            assert!(matches!(
                store.request_get(RequestRef::any(id)).await,
                Err(StoreError::NotFound)
            ));
            assert!(matches!(
                store.request_history(RequestRef::any(id), 0).await,
                Err(StoreError::NotFound)
            ));
        }
        store
            .request_get(RequestRef::any(&live))
            .await
            .expect("an unfinished request stays");
        store.store_close().await;
    }
}

/// A plain connection to the store's database and schema, for what a test
/// checks behind the store's back.
async fn raw(store: &PgStore) -> tokio_postgres::Client {
    let (client, conn) = store
        .options()
        .pg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// Queue counts are kept per connection: rows of connections that are gone
/// fold into one at retention, and the counts stay exact — also when two
/// nodes write at once, and for rows that were there before the counts
/// (the migration counts them once).
mod queue_counts {
    use std::time::Duration;

    use coatcheck_core::clock::truncate;
    use coatcheck_core::Status;
    use coatcheck_store::{
        ClaimParams, SettleParams, Settlement, Store, StoreOptions, SubmitParams,
    };
    use coatcheck_store_postgres::testing::TestSchema;
    use coatcheck_store_postgres::PgStore;
    use serde_json::value::RawValue;

    async fn open(url: &str) -> PgStore {
        PgStore::open(url, StoreOptions::default())
            .await
            .expect("open the store")
    }

    async fn submit(store: &PgStore, queue: &str) {
        let mut new = coatcheck_store::conformance::new_request(queue);
        new.id = coatcheck_core::model::new_request_id();
        store
            .request_submit(SubmitParams {
                new,
                idempotency: None,
                now: truncate(chrono::Utc::now()),
            })
            .await
            .expect("submit");
    }

    async fn counts(store: &PgStore, queue: &str) -> Vec<(Status, u64)> {
        let stats = store
            .queue_stats(truncate(chrono::Utc::now()))
            .await
            .expect("stats");
        let mut c = stats
            .into_iter()
            .find(|q| q.queue == queue)
            .map(|q| q.counts)
            .unwrap_or_default();
        c.sort();
        c
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_of_closed_connections_fold_into_one() {
        let schema = TestSchema::create().await;
        let a = open(&schema.url_with("pool_size=2")).await;
        for _ in 0..3 {
            submit(&a, "fold").await;
        }
        a.store_close().await;
        let b = open(&schema.url()).await;
        let client = super::raw(&b).await;
        let slots = |q: &'static str| {
            let client = &client;
            async move {
                let rows = client
                    .query(
                        "SELECT slot, n FROM queue_counts WHERE queue = $1 ORDER BY slot",
                        &[&q],
                    )
                    .await
                    .expect("slots");
                rows.iter()
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
                    .collect::<Vec<_>>()
            }
        };
        let before = slots("fold").await;
        assert!(
            before.iter().all(|(slot, _)| *slot != 0),
            "the first node wrote to its connections' slots: {before:?}"
        );
        assert_eq!(before.iter().map(|(_, n)| n).sum::<i64>(), 3);
        // Retention (nothing to delete here) folds what closed connections left.
        b.request_purge(truncate(chrono::Utc::now()), 10)
            .await
            .expect("purge");
        assert_eq!(slots("fold").await, vec![(0, 3)]);
        assert_eq!(counts(&b, "fold").await, vec![(Status::Queued, 3)]);
        b.store_close().await;
    }

    /// Ten rounds of: ten submits at once, a claim of seven, five completes.
    async fn work(store: &PgStore) {
        for round in 0..10 {
            let subs: Vec<_> = (0..10).map(|_| submit(store, "both")).collect();
            futures::future::join_all(subs).await;
            let now = truncate(chrono::Utc::now());
            let claimed = store
                .request_claim(ClaimParams {
                    fairness: Default::default(),
                    queue: "both".into(),
                    worker_id: format!("w{round}"),
                    max: 7,
                    lease: Duration::from_secs(60),
                    now,
                })
                .await
                .expect("claim");
            let items = claimed
                .iter()
                .take(5)
                .map(|r| SettleParams {
                    id: r.id.clone(),
                    queue: None,
                    lease_token: r.lease.as_ref().expect("leased").token.clone(),
                    settlement: Settlement::Complete {
                        output: RawValue::from_string("1".into()).unwrap(),
                    },
                })
                .collect();
            store.request_settle_many(items, now).await.expect("settle");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_writing_at_once_keep_them_exact() {
        let schema = TestSchema::create().await;
        let nodes = [open(&schema.url()).await, open(&schema.url()).await];
        tokio::join!(work(&nodes[0]), work(&nodes[1]));
        let client = super::raw(&nodes[0]).await;
        let mut truth: Vec<(Status, u64)> = client
            .query(
                "SELECT status, count(*) FROM requests WHERE queue = 'both' GROUP BY status",
                &[],
            )
            .await
            .expect("truth")
            .iter()
            .map(|r| {
                (
                    Status::parse(r.get::<_, &str>(0)).expect("status"),
                    r.get::<_, i64>(1) as u64,
                )
            })
            .collect();
        truth.sort();
        assert_eq!(counts(&nodes[0], "both").await, truth);
        assert_eq!(counts(&nodes[1], "both").await, truth);
        let total: u64 = truth.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 200);
        for n in &nodes {
            n.store_close().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_migration_counts_the_requests_already_there() {
        let schema = TestSchema::create().await;
        let store = open(&schema.url()).await;
        for _ in 0..4 {
            submit(&store, "old").await;
        }
        // As a database of the previous version was: no counts yet.
        let client = super::raw(&store).await;
        client
            .batch_execute(
                "DROP TABLE queue_counts; DELETE FROM schema_migrations WHERE version = 4",
            )
            .await
            .expect("back to version 3");
        store.store_close().await;
        let store = open(&schema.url()).await;
        assert_eq!(counts(&store, "old").await, vec![(Status::Queued, 4)]);
        store.store_close().await;
    }
}

/// The generic plan PostgreSQL keeps for a prepared statement must not scan
/// the whole table just because the table was small when it was planned:
/// on a fresh, empty schema, the batched row update still finds its rows by
/// the primary key. (Without `enable_seqscan=off` on the store's
/// connections, this plan is a sequential scan that tests every row.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batched_update_uses_the_primary_key_even_on_an_empty_table() {
    let schema = TestSchema::create().await;
    let store = PgStore::open(&schema.url(), StoreOptions::default())
        .await
        .expect("open the store");
    let client = raw(&store).await;
    client
        .batch_execute("SET plan_cache_mode = force_generic_plan")
        .await
        .expect("generic plans");
    let params = (1..=18).map(|_| "NULL").collect::<Vec<_>>().join(", ");
    client
        .batch_execute(&format!(
            "PREPARE u AS {}",
            coatcheck_store_postgres::UPDATE_REQUESTS_SQL
        ))
        .await
        .expect("prepare");
    let plan: Vec<String> = client
        .query(&format!("EXPLAIN EXECUTE u({params})"), &[])
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan on requests"), "{plan}");
    assert!(plan.contains("requests_pkey"), "{plan}");
    drop(client);
    coatcheck_store::Store::store_close(&store).await;
}

/// TLS to the database (`sslmode=` in the store URL), against the local
/// PostgreSQL, which offers TLS with a self-signed certificate.
mod tls {
    use coatcheck_core::clock::truncate;
    use coatcheck_store::{RequestRef, Store, StoreOptions, SubmitParams, Submitted};
    use coatcheck_store_postgres::config::PgOptions;
    use coatcheck_store_postgres::testing::TestSchema;
    use coatcheck_store_postgres::PgStore;

    /// `(ssl, application_name)` of every session of the test database
    /// that this schema's store opened (its URL names the schema as the
    /// application), seen from a connection of the same URL.
    async fn sessions(url: &str) -> Vec<(bool, String)> {
        let o = PgOptions::parse(url).expect("a valid URL");
        let tls = coatcheck_store_postgres::tls::connector(&o.tls, o.client_cert.as_ref())
            .expect("a connector");
        let (client, conn) = o.pg.connect(tls).await.expect("connect");
        let driver = tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT s.ssl, a.application_name FROM pg_stat_ssl s \
                 JOIN pg_stat_activity a ON a.pid = s.pid \
                 WHERE a.application_name = $1",
                &[&o.pg.get_application_name().unwrap_or_default()],
            )
            .await
            .expect("pg_stat_ssl");
        drop(client);
        let _ = driver.await;
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    #[tokio::test]
    async fn require_encrypts_every_connection_of_the_store() {
        let schema = TestSchema::create().await;
        let url = schema.url_with("sslmode=require&pool_size=2");
        let store = PgStore::open(&url, StoreOptions::default())
            .await
            .expect("open over TLS");
        let new = coatcheck_store::conformance::new_request("q-tls");
        let id = match store
            .request_submit(SubmitParams {
                new,
                idempotency: None,
                now: truncate(chrono::Utc::now()),
            })
            .await
            .expect("submit over TLS")
        {
            Submitted::Created(r) => r.id,
            Submitted::Replayed(r) => panic!("replayed {}", r.id),
        };
        let got = store.request_get(RequestRef::any(&id)).await.expect("get");
        assert_eq!(got.queue, "q-tls");
        // The listener, the pooled connections and this one: all encrypted.
        let seen = sessions(&url).await;
        assert!(seen.len() >= 2, "{seen:?}");
        assert!(seen.iter().all(|(ssl, _)| *ssl), "{seen:?}");
        store.store_close().await;
        // Without sslmode, nothing changes: plain TCP, as before.
        let plain = schema.url();
        let store = PgStore::open(&plain, StoreOptions::default())
            .await
            .expect("open");
        let seen = sessions(&plain).await;
        assert!(seen.iter().all(|(ssl, _)| !*ssl), "{seen:?}");
        store.store_close().await;
    }

    #[tokio::test]
    async fn verify_full_refuses_a_certificate_it_cannot_check() {
        let schema = TestSchema::create().await;
        // The local server's certificate is self-signed: not under the
        // public roots.
        let err = PgStore::open(
            &schema.url_with("sslmode=verify-full"),
            StoreOptions::default(),
        )
        .await
        .expect_err("an unverifiable certificate is refused");
        let msg = err.to_string();
        assert!(msg.contains("certificate"), "{msg}");
        // An sslrootcert that cannot be read is a clear error too.
        let err = PgStore::open(
            &schema.url_with("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"),
            StoreOptions::default(),
        )
        .await
        .expect_err("no such root file");
        assert!(err.to_string().contains("sslrootcert"), "{err}");
    }

    /// `verify-ca` checks that the server's certificate chains to
    /// `sslrootcert` but not that it names the host: the local server's
    /// self-signed certificate (read from the file the server names) is its
    /// own CA and names `localhost`, while the tests connect to an address.
    /// `verify-full` refuses that name; `verify-ca` accepts it, encrypts,
    /// and refuses any other CA; without `sslrootcert` it is refused.
    #[tokio::test]
    async fn verify_ca_checks_the_chain_and_not_the_name() {
        let schema = TestSchema::create().await;
        let plain = PgStore::open(&schema.url(), StoreOptions::default())
            .await
            .expect("open");
        let o = PgOptions::parse(&schema.url()).expect("a valid URL");
        let (client, conn) = o.pg.connect(tokio_postgres::NoTls).await.expect("connect");
        let driver = tokio::spawn(conn);
        let cert_file: String = client
            .query_one("SHOW ssl_cert_file", &[])
            .await
            .expect("ssl_cert_file")
            .get(0);
        drop(client);
        let _ = driver.await;
        plain.store_close().await;
        let dir = tempfile::tempdir().expect("a temp dir");
        let server_ca = dir.path().join("server.pem");
        std::fs::copy(&cert_file, &server_ca)
            .unwrap_or_else(|e| panic!("the server's certificate {cert_file}: {e}"));
        let other_ca = dir.path().join("other.pem");
        let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("a CA");
        std::fs::write(&other_ca, other.cert.pem()).expect("write");
        let host = o.pg.get_hosts().first().cloned();
        assert!(
            matches!(&host, Some(tokio_postgres::config::Host::Tcp(h)) if h.parse::<std::net::IpAddr>().is_ok()),
            "the test database is reached by address: {host:?}"
        );

        let with = |mode: &str, ca: &std::path::Path| {
            schema.url_with(&format!(
                "sslmode={mode}&sslrootcert={}&pool_size=1",
                ca.display()
            ))
        };
        let err = PgStore::open(&with("verify-full", &server_ca), StoreOptions::default())
            .await
            .expect_err("the certificate does not name the address");
        assert!(err.to_string().contains("certificate"), "{err}");

        let url = with("verify-ca", &server_ca);
        let store = PgStore::open(&url, StoreOptions::default())
            .await
            .expect("verify-ca accepts a certificate of its CA under another name");
        store.store_ping().await.expect("ready");
        let seen = sessions(&url).await;
        assert!(
            !seen.is_empty() && seen.iter().all(|(ssl, _)| *ssl),
            "{seen:?}"
        );
        store.store_close().await;

        let err = PgStore::open(&with("verify-ca", &other_ca), StoreOptions::default())
            .await
            .expect_err("a certificate of another CA is refused");
        assert!(err.to_string().contains("certificate"), "{err}");

        let err = PgStore::open(
            &schema.url_with("sslmode=verify-ca"),
            StoreOptions::default(),
        )
        .await
        .expect_err("verify-ca without a CA");
        assert!(err.to_string().contains("sslrootcert"), "{err}");
    }

    /// A certificate authority made for one test, and certificates it signs.
    struct Ca {
        issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate().expect("a key");
            Ca {
                issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("a CA"),
            }
        }

        /// A certificate for `names` (subject alternative names) and its key.
        fn issue(&self, names: &[&str]) -> (rcgen::Certificate, rcgen::KeyPair) {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let params = rcgen::CertificateParams::new(names).expect("params");
            let key = rcgen::KeyPair::generate().expect("a key");
            let cert = params.signed_by(&key, &self.issuer).expect("signed");
            (cert, key)
        }
    }

    /// A TLS front for the test database that demands a client certificate
    /// signed by `clients` — what a server with `clientcert=verify-ca` in
    /// its `pg_hba.conf` does (the shared local server's own configuration
    /// is not the tests' to change). It answers PostgreSQL's `SSLRequest`,
    /// completes the handshake, and relays the decrypted session to the
    /// real database; connections without such a certificate fail their
    /// handshake. Answers its address and the certificates clients
    /// presented.
    async fn client_cert_front(
        clients: &Ca,
    ) -> (
        std::net::SocketAddr,
        std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    ) {
        use std::sync::{Arc, Mutex};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(clients.issuer.der().clone()).expect("client CA");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .expect("a client verifier");
        let (server_cert, server_key) = Ca::new("front").issue(&["127.0.0.1"]);
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(server_cert.der().to_vec())],
                PrivateKeyDer::try_from(server_key.serialize_der()).expect("a key"),
            )
            .expect("a server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let o =
            PgOptions::parse(&coatcheck_store_postgres::testing::base_url()).expect("a valid URL");
        let target = match (o.pg.get_hosts().first(), o.pg.get_ports().first()) {
            (Some(tokio_postgres::config::Host::Tcp(h)), Some(p)) => format!("{h}:{p}"),
            other => panic!("the test database is reached over TCP: {other:?}"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (acceptor, target, seen) = (acceptor.clone(), target.clone(), seen2.clone());
                tokio::spawn(async move {
                    // SSLRequest: length 8, code 80877103.
                    let mut request = [0u8; 8];
                    if tcp.read_exact(&mut request).await.is_err()
                        || request != [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]
                        || tcp.write_all(b"S").await.is_err()
                    {
                        return;
                    }
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Some(certs) = tls.get_ref().1.peer_certificates() {
                        seen.lock().unwrap().push(certs[0].to_vec());
                    }
                    let Ok(mut db) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut db).await;
                });
            }
        });
        (addr, seen)
    }

    /// `sslcert` and `sslkey`: every connection of the store (migrations,
    /// the listener, the pool) presents the certificate to a server that
    /// demands one, and works; without it, or with a certificate of another
    /// CA, the server refuses the handshake and the store does not open; an
    /// unreadable key is a clear error.
    #[tokio::test]
    async fn a_client_certificate_is_presented_to_a_server_that_demands_one() {
        let schema = TestSchema::create().await;
        let clients = Ca::new("clients");
        let (front, seen) = client_cert_front(&clients).await;
        let dir = tempfile::tempdir().expect("a temp dir");
        let write = |name: &str, (cert, key): (rcgen::Certificate, rcgen::KeyPair)| {
            let (c, k) = (
                dir.path().join(format!("{name}.crt")),
                dir.path().join(format!("{name}.key")),
            );
            std::fs::write(&c, cert.pem()).expect("write");
            std::fs::write(&k, key.serialize_pem()).expect("write");
            (c, k, cert.der().to_vec())
        };
        let (cert, key, der) = write("node", clients.issue(&["node-1"]));
        let with =
            |extra: &str| schema.url_via(front, &format!("sslmode=require&pool_size=2{extra}"));

        let url = with(&format!(
            "&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        ));
        let store = PgStore::open(&url, StoreOptions::default())
            .await
            .expect("open with a client certificate");
        let id = match store
            .request_submit(SubmitParams {
                new: coatcheck_store::conformance::new_request("q-mtls"),
                idempotency: None,
                now: truncate(chrono::Utc::now()),
            })
            .await
            .expect("submit")
        {
            Submitted::Created(r) => r.id,
            Submitted::Replayed(r) => panic!("replayed {}", r.id),
        };
        let got = store.request_get(RequestRef::any(&id)).await.expect("get");
        assert_eq!(got.queue, "q-mtls");
        store.store_close().await;
        let presented = std::mem::take(&mut *seen.lock().unwrap());
        assert!(
            presented.len() >= 3,
            "migrations, the listener and the pool each presented it: {}",
            presented.len()
        );
        assert!(
            presented.iter().all(|c| *c == der),
            "the node's certificate"
        );

        let err = PgStore::open(&with(""), StoreOptions::default())
            .await
            .expect_err("no certificate: refused");
        assert!(
            matches!(err, coatcheck_store_postgres::OpenError::Connect(_)),
            "{err}"
        );
        let (cert, key, _) = write("stranger", Ca::new("strangers").issue(&["node-1"]));
        let err = PgStore::open(
            &with(&format!(
                "&sslcert={}&sslkey={}",
                cert.display(),
                key.display()
            )),
            StoreOptions::default(),
        )
        .await
        .expect_err("a certificate of another CA: refused");
        assert!(
            matches!(err, coatcheck_store_postgres::OpenError::Connect(_)),
            "{err}"
        );
        assert!(seen.lock().unwrap().is_empty(), "no handshake completed");

        let (_, other_key, _) = write("other", clients.issue(&["node-2"]));
        let (node_cert, _, _) = write("node-again", clients.issue(&["node-1"]));
        let err = PgStore::open(
            &with(&format!(
                "&sslcert={}&sslkey={}",
                node_cert.display(),
                other_key.display()
            )),
            StoreOptions::default(),
        )
        .await
        .expect_err("a key that is not the certificate's");
        assert!(err.to_string().contains("sslkey"), "{err}");

        let missing = dir.path().join("missing.key");
        let err = PgStore::open(
            &with(&format!(
                "&sslcert={}&sslkey={}",
                cert.display(),
                missing.display()
            )),
            StoreOptions::default(),
        )
        .await
        .expect_err("an unreadable key");
        assert!(err.to_string().contains("sslkey"), "{err}");
    }
}
