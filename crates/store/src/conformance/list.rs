//! `request_list`: newest first, pages by `before_id`, and every filter.

use coatcheck_core::Status;

use super::new_request;
use super::support::*;
use crate::{ListParams, Store};

/// The ids of a list call.
async fn list_ids(store: &dyn Store, p: ListParams) -> Vec<String> {
    store
        .request_list(p)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect()
}

/// `ids` newest (greatest) first.
fn newest_first(mut ids: Vec<String>) -> Vec<String> {
    ids.sort_by(|a, b| b.cmp(a));
    ids
}

/// A list is newest first (by id); `before_id` pages through all of it
/// without gaps or repeats, and each page holds at most `limit`.
pub async fn list_is_newest_first_and_pages_with_before_id(store: &dyn Store) {
    let t0 = base();
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(submit_to(store, "q-list", at(t0, i)).await.id);
    }
    let expected = newest_first(ids);
    let page = |before_id: Option<String>| ListParams {
        queue: Some("q-list".into()),
        before_id,
        limit: 3,
        ..Default::default()
    };

    let all = store
        .request_list(ListParams {
            queue: Some("q-list".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        all.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        expected
    );
    let full = get(store, &expected[0]).await;
    assert_same(&all[0], &full, "a listed request is the whole request");

    let mut seen = Vec::new();
    let mut cursor = None;
    for expected_len in [3, 3, 1, 0] {
        let got = list_ids(store, page(cursor.clone())).await;
        assert_eq!(
            got.len(),
            expected_len,
            "a page of limit 3 after {cursor:?}"
        );
        cursor = got.last().cloned().or(cursor);
        seen.extend(got);
    }
    assert_eq!(
        seen, expected,
        "the pages together are the whole list, in order"
    );

    let mid = list_ids(store, page(Some(expected[2].clone()))).await;
    assert_eq!(mid, expected[3..6], "before_id is exclusive");
}

/// Filters by tenant, queue, status and correlation id, alone and combined.
pub async fn list_filters_by_queue_status_correlation_and_tenant(store: &dyn Store) {
    let t0 = base();
    let make = |queue: &str, corr: &str, tenant: &str| {
        let mut new = new_request(queue);
        new.correlation_id = Some(corr.to_string());
        new.tenant = tenant.to_string();
        new
    };
    let a = submit(store, make("q1", "c1", "t1"), at(t0, 1)).await.id;
    let b = submit(store, make("q1", "c2", "t1"), at(t0, 2)).await.id;
    let c = submit(store, make("q2", "c1", "t1"), at(t0, 3)).await.id;
    let d = submit(store, make("q1", "c1", "t2"), at(t0, 4)).await.id;
    // a, the oldest in q1, is claimed: the only running request.
    assert_eq!(claim_one(store, "q1", at(t0, 5)).await.id, a);

    let p = |tenant: Option<&str>,
             queue: Option<&str>,
             status: Option<Status>,
             corr: Option<&str>| ListParams {
        tenant: tenant.map(String::from),
        queue: queue.map(String::from),
        status,
        correlation_id: corr.map(String::from),
        before_id: None,
        limit: 100,
    };
    let cases: Vec<(ListParams, Vec<String>)> = vec![
        (
            p(None, None, None, None),
            vec![a.clone(), b.clone(), c.clone(), d.clone()],
        ),
        (
            p(Some("t1"), None, None, None),
            vec![a.clone(), b.clone(), c.clone()],
        ),
        (p(Some("t2"), None, None, None), vec![d.clone()]),
        (p(Some("t3"), None, None, None), vec![]),
        (
            p(None, Some("q1"), None, None),
            vec![a.clone(), b.clone(), d.clone()],
        ),
        (
            p(Some("t1"), Some("q1"), None, None),
            vec![a.clone(), b.clone()],
        ),
        (p(None, Some("q"), None, None), vec![]),
        (p(None, None, Some(Status::Running), None), vec![a.clone()]),
        (
            p(Some("t1"), None, Some(Status::Queued), None),
            vec![b.clone(), c.clone()],
        ),
        (p(None, None, Some(Status::Succeeded), None), vec![]),
        (
            p(None, None, None, Some("c1")),
            vec![a.clone(), c.clone(), d.clone()],
        ),
        (p(Some("t1"), Some("q1"), None, Some("c1")), vec![a.clone()]),
        (
            p(Some("t1"), Some("q1"), Some(Status::Queued), Some("c1")),
            vec![],
        ),
        (p(Some("t2"), Some("q2"), None, None), vec![]),
    ];
    for (params, expected) in cases {
        let what = format!("{params:?}");
        assert_eq!(
            list_ids(store, params).await,
            newest_first(expected),
            "{what}"
        );
    }
}
