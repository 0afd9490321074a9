//! `request_purge`: retention deletes finished requests older than the
//! cutoff, in bounded batches, and nothing else.

use super::new_request;
use super::support::*;
use crate::{Store, StoreError};

/// Only requests finished before the cutoff go, with their history; queued
/// and running requests stay whatever their age.
pub async fn purge_deletes_only_requests_finished_before_the_cutoff(store: &dyn Store) {
    let t0 = base();
    let old_queued = submit(store, new_request("q-ret-other"), at(t0, 1)).await;
    let old_done = running_in(store, "q-ret", at(t0, 2)).await;
    settle(
        store,
        &old_done.id,
        &token(&old_done),
        completion("1"),
        at(t0, 10),
    )
    .await
    .expect("complete");
    let old_running = running_in(store, "q-ret-run", at(t0, 3)).await;
    let young = running_in(store, "q-ret", at(t0, 21)).await;
    settle(
        store,
        &young.id,
        &token(&young),
        completion("2"),
        at(t0, 5_000),
    )
    .await
    .expect("complete");

    let n = store
        .request_purge(at(t0, 1_000), 100)
        .await
        .expect("purge");
    assert_eq!(n, 1, "only the request finished before the cutoff");
    let gone = store
        .request_get(crate::RequestRef::any(old_done.id.clone()))
        .await;
    assert!(matches!(gone, Err(StoreError::NotFound)), "{gone:?}");
    assert!(matches!(
        store
            .request_history(crate::RequestRef::any(old_done.id.clone()), 0)
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        get(store, &old_queued.id).await.id,
        old_queued.id,
        "queued requests stay"
    );
    assert_eq!(
        get(store, &old_running.id).await.id,
        old_running.id,
        "running requests stay"
    );
    assert_eq!(
        get(store, &young.id).await.id,
        young.id,
        "recently finished requests stay"
    );
    assert_eq!(
        store
            .request_purge(at(t0, 1_000), 100)
            .await
            .expect("purge"),
        0
    );
}

/// A purge takes at most `limit`, oldest first.
pub async fn purge_respects_its_limit(store: &dyn Store) {
    let t0 = base();
    for i in 0..5u64 {
        let r = running_in(store, "q-ret-limit", at(t0, 10 + i)).await;
        settle(store, &r.id, &token(&r), completion("1"), at(t0, 100 + i))
            .await
            .expect("complete");
    }
    assert_eq!(
        store.request_purge(at(t0, 10_000), 2).await.expect("purge"),
        2
    );
    assert_eq!(
        store.request_purge(at(t0, 10_000), 2).await.expect("purge"),
        2
    );
    assert_eq!(
        store.request_purge(at(t0, 10_000), 2).await.expect("purge"),
        1
    );
}
