//! `GET /v1/requests` (filters, AIP-158 paging) and
//! `POST /v1/requests/{id}/redrive`.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use coatcheck_testkit::{assert_problem, TestServer};
use serde_json::{json, Value};

use crate::helpers::*;

async fn list(s: &TestServer, query: &str) -> (Vec<String>, Option<String>) {
    let v = json_of(s.get(&format!("/v1/requests?{query}")).await, 200).await;
    let ids = v["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .map(id)
        .collect();
    let next = v
        .get("next_page_token")
        .and_then(Value::as_str)
        .map(str::to_string);
    (ids, next)
}

#[tokio::test]
async fn list_is_newest_first_and_filters() {
    let s = TestServer::start().await;
    let mut a = Vec::new();
    for i in 0..5 {
        let corr = if i % 2 == 0 { "even" } else { "odd" };
        a.push(id(&s
            .submit("qa", json!({"input": i, "correlation_id": corr}))
            .await));
    }
    let mut b = Vec::new();
    for i in 0..3 {
        b.push(id(&s
            .submit("qb", json!({"input": i, "correlation_id": "even"}))
            .await));
    }
    let all: Vec<String> = a.iter().chain(b.iter()).rev().cloned().collect();
    let (got, next) = list(&s, "").await;
    assert_eq!(got, all, "newest first");
    assert_eq!(next, None, "one page");

    let (got, _) = list(&s, "queue=qa").await;
    assert_eq!(got, a.iter().rev().cloned().collect::<Vec<_>>());
    let (got, _) = list(&s, "correlation_id=even").await;
    assert_eq!(
        got,
        [&b[2], &b[1], &b[0], &a[4], &a[2], &a[0]].map(String::clone)
    );
    let (got, _) = list(&s, "queue=qa&correlation_id=odd").await;
    assert_eq!(got, [a[3].clone(), a[1].clone()]);
    let (got, _) = list(&s, "correlation_id=none").await;
    assert!(got.is_empty());

    // Status filter: complete one, cancel one.
    let c = claim_one(&s, "qb", 30.0).await;
    assert_eq!(c["id"], b[0].as_str(), "FIFO");
    assert_eq!(
        complete(&s, &b[0], &token(&c), json!(1)).await.status(),
        200
    );
    assert_eq!(
        s.http()
            .delete(s.url(&format!("/v1/requests/{}", a[1])))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (got, _) = list(&s, "status=succeeded").await;
    assert_eq!(got, [b[0].clone()]);
    let (got, _) = list(&s, "status=cancelled&queue=qa").await;
    assert_eq!(got, [a[1].clone()]);
    let (got, _) = list(&s, "status=queued").await;
    assert_eq!(got.len(), 6);
    let (got, _) = list(&s, "status=running").await;
    assert!(got.is_empty());
    // Each listed item is the full Request.
    let v = json_of(s.get("/v1/requests?status=succeeded").await, 200).await;
    assert_eq!(v["requests"][0], get_req(&s, &b[0]).await);
}

/// Walks every page of `query` with page size `limit`; returns the ids in
/// order and the number of pages.
async fn walk(s: &TestServer, query: &str, limit: usize) -> (Vec<String>, usize) {
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &token {
            Some(t) => format!("{query}&limit={limit}&page_token={t}"),
            None => format!("{query}&limit={limit}"),
        };
        let (got, next) = list(s, &q).await;
        pages += 1;
        assert!(got.len() <= limit, "page size");
        seen.extend(got);
        match next {
            Some(t) => token = Some(t),
            None => return (seen, pages),
        }
        assert!(pages < 100, "paging does not end");
    }
}

#[tokio::test]
async fn page_tokens_walk_every_item_exactly_once() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    let mut p3 = Vec::new();
    for i in 0..21 {
        let q = if i % 3 == 0 { "p3" } else { "px" };
        let id = id(&s.submit(q, json!({"input": i})).await);
        if q == "p3" {
            p3.push(id.clone());
        }
        ids.push(id);
    }
    ids.reverse();
    p3.reverse();
    let (seen, pages) = walk(&s, "", 7).await;
    assert_eq!(seen, ids, "every item exactly once, newest first");
    assert_eq!(
        pages, 3,
        "21 items in pages of 7: three pages, no empty fourth"
    );
    let (seen, _) = walk(&s, "", 4).await;
    assert_eq!(seen, ids);
    let (seen, pages) = walk(&s, "queue=p3", 2).await;
    assert_eq!(seen, p3, "paging with a filter");
    assert_eq!(pages, 4);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len());

    // A new request does not disturb a walk in progress (it is newer than the cursor).
    let (first, next) = list(&s, "limit=10").await;
    s.submit("px", json!({"input": "new"})).await;
    let (second, _) = list(&s, &format!("limit=100&page_token={}", next.unwrap())).await;
    assert_eq!(first.len() + second.len(), 21);
    assert!(first.iter().all(|i| !second.contains(i)));
    // An empty page_token is the first page.
    let (got, _) = list(&s, "limit=3&page_token=").await;
    assert_eq!(got.len(), 3);
}

#[tokio::test]
async fn bad_list_parameters_are_400_problems() {
    let s = TestServer::start().await;
    s.submit("q", json!({"input": 1})).await;
    let b64 = |t: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t);
    let forged = [
        "garbage".to_string(),
        "!!!".to_string(),
        b64("v1:not-a-uuid"),
        b64("v2:0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77"),
        b64("0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77"),
        "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77".to_string(),
    ];
    for t in &forged {
        let p = assert_problem(
            s.get(&format!("/v1/requests?page_token={}", enc(t))).await,
            400,
            "invalid-request",
        )
        .await;
        assert_eq!(p.extensions["field"], "page_token", "{t}");
    }
    for q in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "limit=-1",
        "limit=1.5",
        "status=done",
        "status=",
        "queue=a%20b",
        "queue=-x",
    ] {
        assert_problem(
            s.get(&format!("/v1/requests?{q}")).await,
            400,
            "invalid-request",
        )
        .await;
    }
    // The bounds themselves are fine.
    for q in ["limit=1", "limit=1000"] {
        assert_eq!(
            s.get(&format!("/v1/requests?{q}")).await.status(),
            200,
            "{q}"
        );
    }
}

async fn redrive(s: &TestServer, id: &str) -> reqwest::Response {
    s.post(&format!("/v1/requests/{id}/redrive"), json!({}))
        .await
}

#[tokio::test]
async fn redrive_puts_failed_cancelled_and_expired_back_in_the_queue() {
    let s = TestServer::with_manual_clock().await;
    // failed: dead-lettered after its only attempt.
    let failed = id(&s
        .submit("rd", json!({"input": "f", "max_attempts": 1}))
        .await);
    let c = claim_one(&s, "rd", 30.0).await;
    assert_eq!(fail(&s, &failed, &token(&c), json!({})).await.status(), 200);
    assert_eq!(get_req(&s, &failed).await["status"], "failed");
    // cancelled while queued.
    let cancelled = id(&s.submit("rd", json!({"input": "c"})).await);
    assert_eq!(
        s.http()
            .delete(s.url(&format!("/v1/requests/{cancelled}")))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // expired by its deadline.
    let expired = id(&s.submit("rd", json!({"input": "e", "timeout": 5})).await);
    s.advance(Duration::from_secs(6));
    assert_eq!(wait_terminal(&s, &expired).await["status"], "expired");

    for (id, from) in [
        (&failed, "failed"),
        (&cancelled, "cancelled"),
        (&expired, "expired"),
    ] {
        let r = json_of(redrive(&s, id).await, 200).await;
        assert_eq!(r["status"], "queued", "{from}");
        assert_eq!(r["attempts"], 0);
        assert_eq!(r["error"], Value::Null);
        assert_eq!(r["finished_at"], Value::Null);
        assert_eq!(r["cancel_requested"], false);
        let h = history(&s, id).await;
        assert_eq!(h.last().unwrap()["kind"], "redriven");
        assert_eq!(h.last().unwrap()["from"], from);
    }
    assert_eq!(
        get_req(&s, &expired).await["deadline"],
        Value::Null,
        "a passed deadline is dropped"
    );
    // All three are claimable again, with fresh attempts, oldest first.
    let got = claim_wait(&s, "rd", 10, 30.0, 5.0).await;
    let got_ids: Vec<String> = got.iter().map(id).collect();
    assert_eq!(
        got_ids,
        [failed.clone(), cancelled.clone(), expired.clone()]
    );
    assert!(got.iter().all(|c| c["attempt"] == 1));
    // Running and succeeded (and queued) requests cannot be redriven.
    let p = assert_problem(redrive(&s, &failed).await, 409, "wrong-state").await;
    assert_eq!(p.extensions["request_status"], "running");
    assert_eq!(
        complete(&s, &failed, &token(&got[0]), json!(1))
            .await
            .status(),
        200
    );
    let p = assert_problem(redrive(&s, &failed).await, 409, "wrong-state").await;
    assert_eq!(p.extensions["request_status"], "succeeded");
    let queued = id(&s.submit("rd", json!({"input": "q"})).await);
    let p = assert_problem(redrive(&s, &queued).await, 409, "wrong-state").await;
    assert_eq!(p.extensions["request_status"], "queued");
    assert_problem(
        redrive(&s, "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77").await,
        404,
        "not-found",
    )
    .await;
    assert_problem(redrive(&s, "nope").await, 404, "not-found").await;
}
