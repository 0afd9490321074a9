//! `request_submit` and `request_get`: what goes in comes back, idempotency
//! keys, tenant scoping.

use std::collections::BTreeMap;

use coatcheck_core::model::new_request_id;
use coatcheck_core::{EventKind, ReplyTo, Status, WebhookTarget};

use super::support::*;
use super::{new_request, TENANT};
use crate::{ListParams, RequestRef, Store, StoreError, Submitted};

/// Input with odd spacing, key order, an escape and a trailing zero: only a
/// store that keeps the bytes gives it back unchanged.
const ODD_INPUT: &str = "{\"z\": 1,  \"a\":[1.50, \"\\u00e9\"],\n\"n\":null }";

/// Every field of a submission round-trips through the store, the input byte
/// for byte, and the derived fields (`run_after`, `deadline`, fairness key)
/// are what the rules make of them.
pub async fn submit_then_get_returns_the_same_request(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-submit");
    new.input = raw(ODD_INPUT);
    new.correlation_id = Some("order-42".into());
    new.priority = 7;
    new.delay = Some(secs(30));
    new.timeout = Some(secs(600));
    new.max_attempts = 5;
    new.reply_to = Some(ReplyTo::Channel("replies".into()));
    new.metadata = BTreeMap::from([
        ("k".to_string(), "v".to_string()),
        ("a".to_string(), "b c".to_string()),
    ]);
    new.fallback_queue = Some("q-fallback".into());
    let id = new.id.clone();

    let created = submit(store, new.clone(), t0).await;
    assert_eq!(created.id, id);
    assert_eq!(created.tenant, TENANT);
    assert_eq!(created.queue, "q-submit");
    assert_eq!(created.status, Status::Queued);
    assert_eq!(created.input.get(), ODD_INPUT);
    assert_eq!(created.correlation_id.as_deref(), Some("order-42"));
    assert_eq!(created.priority, 7);
    assert_eq!(created.run_after, Some(at(t0, 30_000)));
    assert_eq!(created.deadline, Some(at(t0, 600_000)));
    assert_eq!(created.max_attempts, 5);
    assert_eq!(created.attempts, 0);
    assert_eq!(created.reply_to, new.reply_to);
    assert_eq!(created.metadata, new.metadata);
    assert_eq!(created.fallback_queue.as_deref(), Some("q-fallback"));
    assert_eq!(created.fallback_of, None);
    assert_eq!(created.fallback_request_id, None);
    assert_eq!(
        created.fairness_key, TENANT,
        "the fairness key defaults to the tenant"
    );
    assert_eq!((created.created_at, created.updated_at), (t0, t0));
    assert!(created.output.is_none() && created.error.is_none() && created.progress.is_none());
    assert!(created.finished_at.is_none() && created.lease.is_none() && !created.cancel_requested);

    let stored = get(store, &id).await;
    assert_same(
        &stored,
        &created,
        "get (any tenant) returns what submit returned",
    );
    assert_eq!(
        stored.input.get(),
        ODD_INPUT,
        "the input bytes are kept byte for byte"
    );
    let scoped = store
        .request_get(as_tenant(&id, TENANT))
        .await
        .expect("get as the owner");
    assert_same(&scoped, &created, "get as the owning tenant");

    let events = history(store, &id).await;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].seq, events[0].at), (1, t0));
    match &events[0].kind {
        EventKind::Submitted { queue, run_after } => {
            assert_eq!(queue, "q-submit");
            assert_eq!(*run_after, Some(at(t0, 30_000)));
        }
        other => panic!("expected submitted, got {other:?}"),
    }

    // The other return address, an explicit fairness key, and the absent options.
    let t1 = at(t0, 1);
    let mut other = new_request("q-submit");
    other.reply_to = Some(ReplyTo::Webhook(WebhookTarget {
        url: "https://example.com/hook?x=1".into(),
    }));
    other.fairness_key = Some("fk-custom".into());
    other.delay = Some(secs(0));
    let other_id = other.id.clone();
    let created = submit(store, other.clone(), t1).await;
    assert_eq!(created.reply_to, other.reply_to);
    assert_eq!(created.fairness_key, "fk-custom");
    assert_eq!(created.run_after, None, "a zero delay is no delay");
    assert_eq!(created.deadline, None);
    assert_eq!(created.correlation_id, None);
    assert_eq!(created.fallback_queue, None);
    assert!(created.metadata.is_empty());
    assert_eq!(created.max_attempts, 3);
    assert_eq!(created.input.get(), r#"{"n":1}"#);
    assert_same(
        &get(store, &other_id).await,
        &created,
        "the second request round-trips",
    );
}

/// The same key with the same body hash replays the first request and stores
/// nothing new.
pub async fn idempotent_submit_with_same_key_returns_the_existing_request(store: &dyn Store) {
    let t0 = base();
    let first = submit_with(store, new_request("q-idem"), Some(("key-1", "hash-1")), t0)
        .await
        .expect("first submit");

    let again = new_request("q-idem");
    let again_id = again.id.clone();
    match submit_raw(store, again, Some(("key-1", "hash-1")), at(t0, 1_000)).await {
        Ok(Submitted::Replayed(r)) => assert_same(&r, &first, "the replay is the first request"),
        other => panic!("expected a replay, got {other:?}"),
    }
    assert_unchanged(store, &first, "a replay").await;
    let err = expect_err(
        store.request_get(RequestRef::any(&again_id)).await,
        "the replay's own id",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let all = store
        .request_list(ListParams {
            queue: Some("q-idem".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [first.id.as_str()]
    );

    // A key is remembered however the request moved on.
    let running = claim_one(store, "q-idem", at(t0, 2_000)).await;
    match submit_raw(
        store,
        new_request("q-idem"),
        Some(("key-1", "hash-1")),
        at(t0, 3_000),
    )
    .await
    {
        Ok(Submitted::Replayed(r)) => {
            assert_same(&r, &running, "the replay shows the current state")
        }
        other => panic!("expected a replay, got {other:?}"),
    }
}

/// Many submits of one key at once (group-committed together, or racing
/// each other): exactly one request is created, every other submit replays
/// it, and one with another body is refused.
pub async fn concurrent_submits_of_one_key_create_one_request(store: &dyn Store) {
    let t0 = base();
    let calls = (0..12).map(|i| {
        let hash = if i == 7 { "hash-other" } else { "hash-1" };
        submit_raw(
            store,
            new_request("q-idem-race"),
            Some(("key-race", hash)),
            at(t0, i),
        )
    });
    let results = futures::future::join_all(calls).await;
    let mut created = Vec::new();
    let mut replayed = Vec::new();
    let mut refused = 0;
    for r in results {
        match r {
            Ok(Submitted::Created(r)) => created.push(r.id),
            Ok(Submitted::Replayed(r)) => replayed.push(r.id),
            Err(StoreError::IdempotencyMismatch) => refused += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    // The odd body is refused unless it came first; then it is the one created
    // and the others mismatch it.
    assert_eq!(created.len(), 1, "one request is created: {created:?}");
    assert!(replayed.iter().all(|id| *id == created[0]), "{replayed:?}");
    assert!(refused == 1 || refused == 11, "refused {refused}");
    let all = store
        .request_list(ListParams {
            queue: Some("q-idem-race".into()),
            limit: 20,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [created[0].as_str()]
    );
}

/// The same key with another body hash is refused and stores nothing.
pub async fn idempotent_submit_with_other_body_is_a_mismatch(store: &dyn Store) {
    let t0 = base();
    let first = submit_with(store, new_request("q-idem"), Some(("key-1", "hash-1")), t0)
        .await
        .expect("first submit");

    let other = new_request("q-idem");
    let other_id = other.id.clone();
    let err = expect_err(
        submit_raw(store, other, Some(("key-1", "hash-2")), at(t0, 1_000)).await,
        "mismatch",
    );
    assert!(matches!(err, StoreError::IdempotencyMismatch), "{err:?}");
    assert_unchanged(store, &first, "a mismatched key").await;
    let err = expect_err(
        store.request_get(RequestRef::any(&other_id)).await,
        "the refused id",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    // A different key is a different request.
    let second = submit_with(
        store,
        new_request("q-idem"),
        Some(("key-2", "hash-2")),
        at(t0, 2_000),
    )
    .await
    .expect("another key");
    assert_ne!(second.id, first.id);
}

/// Two tenants may use the same key for different requests.
pub async fn idempotency_keys_are_per_tenant(store: &dyn Store) {
    let t0 = base();
    let mine = submit_with(
        store,
        new_request("q-idem"),
        Some(("shared-key", "hash-1")),
        t0,
    )
    .await
    .expect("t1 submit");

    let mut theirs = new_request("q-idem");
    theirs.tenant = "t2".into();
    let theirs = submit_with(store, theirs, Some(("shared-key", "hash-2")), at(t0, 1))
        .await
        .expect("t2 may use the same key with another body");
    assert_ne!(theirs.id, mine.id);
    assert_eq!(theirs.tenant, "t2");

    let mut replay = new_request("q-idem");
    replay.tenant = "t2".into();
    match submit_raw(store, replay, Some(("shared-key", "hash-2")), at(t0, 2)).await {
        Ok(Submitted::Replayed(r)) => assert_eq!(r.id, theirs.id, "t2's key finds t2's request"),
        other => panic!("expected t2's replay, got {other:?}"),
    }
    match submit_raw(
        store,
        new_request("q-idem"),
        Some(("shared-key", "hash-1")),
        at(t0, 3),
    )
    .await
    {
        Ok(Submitted::Replayed(r)) => assert_eq!(r.id, mine.id, "t1's key finds t1's request"),
        other => panic!("expected t1's replay, got {other:?}"),
    }
    assert_unchanged(store, &mine, "replays").await;
}

/// Another tenant's request is invisible: not found, not forbidden.
pub async fn get_of_another_tenants_request_is_not_found(store: &dyn Store) {
    let t0 = base();
    let req = submit_to(store, "q-tenant", t0).await;

    let err = expect_err(
        store.request_get(as_tenant(&req.id, "t2")).await,
        "get as t2",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let err = expect_err(
        store.request_history(as_tenant(&req.id, "t2"), 0).await,
        "history as t2",
    );
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    let mine = store
        .request_get(as_tenant(&req.id, TENANT))
        .await
        .expect("get as the owner");
    assert_same(&mine, &req, "the owner sees it");
    let any = store
        .request_get(RequestRef::any(&req.id))
        .await
        .expect("get as any tenant");
    assert_same(&any, &req, "an unscoped get sees it");
}

/// Unknown and malformed ids are not found (never an internal error).
pub async fn get_of_unknown_id_is_not_found(store: &dyn Store) {
    submit_to(store, "q-unknown", base()).await;
    for id in [
        new_request_id(),
        "not-a-request-id".to_string(),
        String::new(),
    ] {
        let err = expect_err(
            store.request_get(RequestRef::any(&id)).await,
            "get of an unknown id",
        );
        assert!(matches!(err, StoreError::NotFound), "{id:?}: {err:?}");
        let err = expect_err(
            store.request_get(as_tenant(&id, TENANT)).await,
            "scoped get of an unknown id",
        );
        assert!(matches!(err, StoreError::NotFound), "{id:?}: {err:?}");
        let err = expect_err(
            store.request_history(RequestRef::any(&id), 0).await,
            "history of an unknown id",
        );
        assert!(matches!(err, StoreError::NotFound), "{id:?}: {err:?}");
    }
}

/// A submit answered before its flush (`request_submit_unsynced`, for a
/// caller that holds its answer) stores the same request as a submit, with
/// the same idempotency; a mark, if the store hands one out, is made good by
/// `sync_through` (at once the second time), and so is a mark already covered.
pub async fn an_unsynced_submit_stores_the_same_request(store: &dyn Store) {
    let t0 = base();
    let new = new_request("q-unsynced");
    let id = new.id.clone();
    let (created, mark) = store
        .request_submit_unsynced(submit_params(new, Some(("key-unsynced", "hash-1")), t0))
        .await
        .expect("unsynced submit");
    let Submitted::Created(created) = created else {
        panic!("expected a new request, got {created:?}");
    };
    assert_eq!(
        (created.id.as_str(), created.status),
        (id.as_str(), Status::Queued)
    );
    if let Some(mark) = mark {
        store.sync_through(mark).await.expect("flushed");
        store.sync_through(mark).await.expect("covered already");
    }
    assert_same(
        &get(store, &id).await,
        &created,
        "get after an unsynced submit",
    );

    // The key works like any other: a plain submit with it is a replay, and so
    // is an unsynced one.
    match submit_raw(
        store,
        new_request("q-unsynced"),
        Some(("key-unsynced", "hash-1")),
        at(t0, 1_000),
    )
    .await
    {
        Ok(Submitted::Replayed(r)) => assert_eq!(r.id, id),
        other => panic!("expected a replay, got {other:?}"),
    }
    let (again, mark) = store
        .request_submit_unsynced(submit_params(
            new_request("q-unsynced"),
            Some(("key-unsynced", "hash-1")),
            at(t0, 2_000),
        ))
        .await
        .expect("unsynced replay");
    assert!(
        matches!(&again, Submitted::Replayed(r) if r.id == id),
        "{again:?}"
    );
    if let Some(mark) = mark {
        store.sync_through(mark).await.expect("flushed");
    }
    // It is claimed like any request.
    assert_eq!(claim_one(store, "q-unsynced", at(t0, 3_000)).await.id, id);
}
