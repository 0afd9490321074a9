//! The worker side: claims (long-poll, `max`, order, no double leases),
//! heartbeat and complete (fencing, idempotency).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use coatcheck_testkit::{assert_problem, TestServer};
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn a_claim_long_poll_wakes_when_a_request_arrives() {
    let s = Arc::new(TestServer::start().await);
    let sub = s.clone();
    let submitter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await; // arrives while the claim waits
        id(&sub
            .submit(
                "wake",
                json!({"input": "hello", "correlation_id": "c1", "metadata": {"m": "1"}}),
            )
            .await)
    });
    let (got, took) = timed(claim_wait(&s, "wake", 5, 30.0, 20.0)).await;
    let submitted = submitter.await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(
        took < Duration::from_secs(5),
        "woken by the submit, not by the 20 s wait: {took:?}"
    );
    let c = &got[0];
    assert_eq!(c["id"], submitted.as_str());
    assert_eq!(c["input"], "hello");
    assert_eq!(c["attempt"], 1);
    assert_eq!(c["correlation_id"], "c1");
    assert_eq!(c["metadata"], json!({"m": "1"}));
    assert_eq!(c["deadline"], Value::Null);
    assert!(!token(c).is_empty());
    let r = get_req(&s, &submitted).await;
    assert_eq!(r["status"], "running");
    let lease = secs_between(&r["updated_at"], &c["lease_expires_at"]);
    assert!(
        (lease - 30.0).abs() < 0.01,
        "lease_expires_at is claim time + lease: {lease}"
    );
    // A submit to another queue does not satisfy (or wake) this claim.
    let other = s.clone();
    let t = tokio::spawn(async move { other.submit("not-wake", json!({"input": 1})).await });
    let (got, took) = timed(claim_wait(&s, "wake", 1, 30.0, 1.0)).await;
    t.await.unwrap();
    assert!(got.is_empty());
    assert!(took >= Duration::from_millis(900), "{took:?}");
}

#[tokio::test]
async fn claims_respect_max_and_take_priority_then_oldest() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for p in [0, 5, 0, 5, -1, 9] {
        ids.push(id(&s
            .submit("ord", json!({"input": p, "priority": p}))
            .await));
    }
    // Default max is 1.
    let v = json_of(claim_raw(&s, "ord", json!({"worker_id": "w"})).await, 200).await;
    let got = v["requests"].as_array().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], ids[5].as_str(), "highest priority first");
    let got: Vec<String> = s.claim("ord", 3).await.iter().map(id).collect();
    assert_eq!(
        got,
        [ids[1].clone(), ids[3].clone(), ids[0].clone()],
        "then oldest first within a priority"
    );
    let got: Vec<String> = s.claim("ord", 3).await.iter().map(id).collect();
    assert_eq!(got, [ids[2].clone(), ids[4].clone()], "max is a ceiling");
    assert!(s.claim("ord", 3).await.is_empty());
    // max = 100 is allowed.
    for i in 0..120 {
        s.submit("many", json!({"input": i})).await;
    }
    assert_eq!(s.claim("many", 100).await.len(), 100);
    assert_eq!(s.claim("many", 100).await.len(), 20);
}

#[tokio::test]
async fn bad_claim_bodies_are_400_problems() {
    let s = TestServer::start().await;
    s.submit("bad", json!({"input": 1})).await;
    for (body, field) in [
        (json!({"worker_id": "w", "max": 0}), "max"),
        (json!({"worker_id": "w", "max": 101}), "max"),
        (json!({"worker_id": "w", "lease": -1}), "lease"),
        (json!({"worker_id": "w", "lease": 0}), "lease"),
        (json!({"worker_id": "w", "wait": -1}), "wait"),
        (json!({"worker_id": "w", "wait": -0.1}), "wait"),
        (json!({"worker_id": ""}), "worker_id"),
        (json!({"worker_id": "a\u{7}b"}), "worker_id"),
    ] {
        let p = assert_problem(
            claim_raw(&s, "bad", body.clone()).await,
            400,
            "invalid-request",
        )
        .await;
        assert_eq!(p.extensions["field"], field, "{body}");
    }
    for body in [
        json!({}),
        json!({"max": 1}),
        json!({"worker_id": 7}),
        json!({"worker_id": "w", "max": "1"}),
        json!({"worker_id": "w", "max": -1}),
        json!({"worker_id": "w", "lease": "30"}),
        json!({"worker_id": "w", "wait": [1]}),
    ] {
        assert_problem(claim_raw(&s, "bad", body).await, 400, "invalid-json").await;
    }
    for q in ["a%20b", "-x", &"q".repeat(129)] {
        let p = assert_problem(
            claim_raw(&s, q, json!({"worker_id": "w"})).await,
            400,
            "invalid-request",
        )
        .await;
        assert_eq!(p.extensions["field"], "queue");
    }
    // None of that claimed anything.
    assert_eq!(s.claim("bad", 10).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_never_share_a_request() {
    let s = Arc::new(TestServer::start().await);
    let mut submits = tokio::task::JoinSet::new();
    for i in 0..300 {
        let s = s.clone();
        submits.spawn(async move { id(&s.submit("race", json!({"input": i})).await) });
    }
    let mut submitted = HashSet::new();
    while let Some(id) = submits.join_next().await {
        assert!(submitted.insert(id.unwrap()));
    }
    let mut claimers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let s = s.clone();
        claimers.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let body = json!({"worker_id": format!("w{w}"), "max": 7, "lease": 60});
                let v = json_of(claim_raw(&s, "race", body).await, 200).await;
                let got = v["requests"].as_array().unwrap().clone();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.iter().map(|c| (id(c), token(c))));
            }
        });
    }
    let mut claimed = HashSet::new();
    let mut tokens = HashSet::new();
    while let Some(mine) = claimers.join_next().await {
        for (id, tok) in mine.unwrap() {
            assert!(claimed.insert(id.clone()), "{id} was claimed twice");
            assert!(tokens.insert(tok));
        }
    }
    assert_eq!(claimed, submitted, "every request claimed exactly once");
    let v = json_of(s.get("/v1/queues").await, 200).await;
    let q = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "race")
        .unwrap()
        .clone();
    assert_eq!(q["counts"]["running"], 300);
    assert_eq!(q["counts"]["queued"], 0);
}

#[tokio::test]
async fn heartbeat_extends_the_lease_and_records_progress() {
    let s = TestServer::start().await;
    let id = id(&s.submit("hb", json!({"input": 1})).await);
    let c = claim_one(&s, "hb", 30.0).await;
    let tok = token(&c);
    let hb = json_of(
        heartbeat(&s, &id, json!({"lease_token": tok, "extend": 120})).await,
        200,
    )
    .await;
    assert_eq!(hb["cancel_requested"], false);
    let moved = secs_between(&c["lease_expires_at"], &hb["lease_expires_at"]);
    assert!(
        moved > 85.0,
        "extend 120 moves a 30 s lease by about 90 s: {moved}"
    );
    // Without extend, the lease is renewed by its own length (30 s from now).
    let hb2 = json_of(
        heartbeat(
            &s,
            &id,
            json!({"lease_token": tok, "progress": {"pct": 10}}),
        )
        .await,
        200,
    )
    .await;
    let back = secs_between(&hb2["lease_expires_at"], &hb["lease_expires_at"]);
    assert!(back > 85.0, "renewed to now + 30 s: {back}");
    assert!(secs_between(&c["lease_expires_at"], &hb2["lease_expires_at"]) >= 0.0);
    // Progress shows on GET and in the history, the last one wins.
    let p2 = json!({"pct": 60, "stage": "resize", "n": [1, 2]});
    assert_eq!(
        heartbeat(&s, &id, json!({"lease_token": tok, "progress": p2}))
            .await
            .status(),
        200
    );
    let r = get_req(&s, &id).await;
    assert_eq!(r["progress"], p2);
    assert_eq!(r["status"], "running");
    let h = history(&s, &id).await;
    let progress: Vec<&Value> = h
        .iter()
        .filter(|e| e["kind"] == "progress")
        .map(|e| &e["progress"])
        .collect();
    assert_eq!(progress, [&json!({"pct": 10}), &p2]);
    assert_eq!(
        kinds(&s, &id).await,
        ["submitted", "claimed", "progress", "progress"],
        "plain renewals add no history"
    );

    // A token that is not the current lease: 409 lease-lost, nothing changes.
    let before = get_req(&s, &id).await;
    let p = assert_problem(
        heartbeat(&s, &id, json!({"lease_token": "0123abcd", "progress": 1})).await,
        409,
        "lease-lost",
    )
    .await;
    assert_eq!(p.extensions["request_status"], "running");
    assert_eq!(get_req(&s, &id).await, before);
    // Bad bodies.
    assert_problem(
        heartbeat(&s, &id, json!({"lease_token": tok, "extend": -1})).await,
        400,
        "invalid-request",
    )
    .await;
    assert_problem(
        heartbeat(&s, &id, json!({"lease_token": tok, "extend": 0})).await,
        400,
        "invalid-request",
    )
    .await;
    assert_problem(
        heartbeat(&s, &id, json!({"lease_token": ""})).await,
        400,
        "invalid-request",
    )
    .await;
    assert_problem(
        heartbeat(&s, &id, json!({"progress": 1})).await,
        400,
        "invalid-json",
    )
    .await;
    assert_problem(
        heartbeat(&s, &id, json!({"lease_token": tok, "extend": "9"})).await,
        400,
        "invalid-json",
    )
    .await;
    // After completion the token is stale for heartbeats.
    assert_eq!(complete(&s, &id, &tok, json!(1)).await.status(), 200);
    let p = assert_problem(
        heartbeat(&s, &id, json!({"lease_token": tok})).await,
        409,
        "lease-lost",
    )
    .await;
    assert_eq!(p.extensions["request_status"], "succeeded");
    // Unknown and malformed ids.
    assert_problem(
        heartbeat(
            &s,
            "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77",
            json!({"lease_token": tok}),
        )
        .await,
        404,
        "not-found",
    )
    .await;
    assert_problem(
        heartbeat(&s, "x", json!({"lease_token": tok})).await,
        404,
        "not-found",
    )
    .await;
}

#[tokio::test]
async fn complete_is_idempotent_with_the_current_token_and_fenced_otherwise() {
    let s = TestServer::start().await;
    let id = id(&s.submit("cp", json!({"input": 1})).await);
    let c = claim_one(&s, "cp", 30.0).await;
    let tok = token(&c);
    // Another token, or a token of another request: 409, nothing changes.
    let other = s.submit("cp", json!({"input": 2})).await;
    let oc = claim_one(&s, "cp", 30.0).await;
    assert_eq!(oc["id"], other["id"]);
    let before = get_req(&s, &id).await;
    for bad in ["ffffffffffffffffffffffffffffffff".to_string(), token(&oc)] {
        let p = assert_problem(
            complete(&s, &id, &bad, json!("evil")).await,
            409,
            "lease-lost",
        )
        .await;
        assert_eq!(p.extensions["request_status"], "running");
        assert_problem(
            fail(&s, &id, &bad, json!({"retryable": false})).await,
            409,
            "lease-lost",
        )
        .await;
    }
    assert_eq!(get_req(&s, &id).await, before, "nothing changed");

    let first = json_of(complete(&s, &id, &tok, json!({"answer": 42})).await, 200).await;
    assert_eq!(first["status"], "succeeded");
    assert_eq!(first["output"], json!({"answer": 42}));
    assert_eq!(first["attempts"], 1);
    // Again with the same token: 200, the same result (even if the output differs).
    let again = json_of(complete(&s, &id, &tok, json!({"answer": 42})).await, 200).await;
    assert_eq!(again, first);
    let again = json_of(complete(&s, &id, &tok, json!("changed my mind")).await, 200).await;
    assert_eq!(again, first, "the first completion stands");
    assert_eq!(kinds(&s, &id).await, ["submitted", "claimed", "succeeded"]);
    // But a fail after completion is refused.
    let p = assert_problem(fail(&s, &id, &tok, json!({})).await, 409, "lease-lost").await;
    assert_eq!(p.extensions["request_status"], "succeeded");
    // And the other request's token does not complete this one.
    assert_problem(
        complete(&s, &id, &token(&oc), json!(0)).await,
        409,
        "lease-lost",
    )
    .await;
    assert_eq!(get_req(&s, &id).await, first);

    // Completing a queued request (never claimed) is a conflict too.
    let q = id_of_new(&s).await;
    assert_problem(complete(&s, &q, &tok, json!(1)).await, 409, "lease-lost").await;
    assert_eq!(get_req(&s, &q).await["status"], "queued");
    // Bad bodies and ids.
    assert_problem(
        s.post(&format!("/v1/requests/{q}/complete"), json!({"output": 1}))
            .await,
        400,
        "invalid-json",
    )
    .await;
    assert_problem(
        s.post(
            &format!("/v1/requests/{q}/complete"),
            json!({"lease_token": 5}),
        )
        .await,
        400,
        "invalid-json",
    )
    .await;
    let long = "t".repeat(200);
    assert_problem(
        complete(&s, &q, &long, json!(1)).await,
        400,
        "invalid-request",
    )
    .await;
    assert_problem(
        complete(&s, "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77", &tok, json!(1)).await,
        404,
        "not-found",
    )
    .await;
    assert_problem(
        complete(&s, "bogus", &tok, json!(1)).await,
        404,
        "not-found",
    )
    .await;
}

async fn id_of_new(s: &TestServer) -> String {
    id(&s.submit("cp-q", json!({"input": 0})).await)
}

#[tokio::test]
async fn a_waiting_claim_is_woken_by_a_redrive_and_by_a_retry() {
    let s = Arc::new(TestServer::start().await);
    let rid = id(&s.submit("wk", json!({"input": 1, "max_attempts": 2})).await);
    let c = claim_one(&s, "wk", 30.0).await;
    assert_eq!(
        fail(&s, &rid, &token(&c), json!({"retryable": false}))
            .await
            .status(),
        200
    );
    // The dead-lettered request comes back by a redrive while a claim waits.
    let op = s.clone();
    let id2 = rid.clone();
    let redrive = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await; // while the claim waits
        op.post(&format!("/v1/requests/{id2}/redrive"), json!({}))
            .await
            .status()
    });
    let (got, took) = timed(claim_wait(&s, "wk", 1, 30.0, 20.0)).await;
    assert_eq!(redrive.await.unwrap(), 200);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], rid.as_str());
    assert_eq!(got[0]["attempt"], 1, "fresh attempts");
    assert!(
        took < Duration::from_secs(5),
        "woken by the redrive: {took:?}"
    );
    // A retryable failure without backoff wakes a waiting claim at once.
    let op = s.clone();
    let (id3, tok) = (rid.clone(), token(&got[0]));
    let retry = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fail(&op, &id3, &tok, json!({"retry_after": 0}))
            .await
            .status()
    });
    let (got, took) = timed(claim_wait(&s, "wk", 1, 30.0, 20.0)).await;
    assert_eq!(retry.await.unwrap(), 200);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["attempt"], 2);
    assert!(
        took < Duration::from_secs(5),
        "woken by the retry: {took:?}"
    );
}

/// How many times claims on `queue` looked at the store, from `/metrics`.
async fn claim_looks(s: &TestServer, queue: &str) -> u64 {
    let text = s.get("/metrics").await.text().await.unwrap();
    let prefix = format!("coatcheck_claim_looks_total{{queue=\"{queue}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Twenty claims wait on a queue: a submit wakes one of them, not all
/// twenty (each woken claim looks at the store again — a thundering herd on
/// a store whose claims wait for wake-ups), and nineteen more submits reach
/// the other nineteen, none lost and none shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_wakes_one_waiting_claim_not_all() {
    let s = Arc::new(TestServer::start().await);
    let waiting: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { claim_wait(&s, "herd", 1, 30.0, 15.0).await })
        })
        .collect();
    // Every claim has looked once and is waiting (a store that parks claims
    // instead never looks again: there, this is just a pause).
    let until = std::time::Instant::now() + Duration::from_secs(1);
    while claim_looks(&s, "herd").await < 20 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = claim_looks(&s, "herd").await;
    let first = id(&s.submit("herd", json!({"input": 0})).await);
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !waiting.iter().any(|t| t.is_finished()) && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let woken = claim_looks(&s, "herd").await - before;
    assert!(
        woken <= 2,
        "one submit made waiting claims look {woken} times (20 were waiting)"
    );
    let mut ids = vec![first];
    for i in 1..20 {
        ids.push(id(&s.submit("herd", json!({"input": i})).await));
    }
    let mut claimed = HashSet::new();
    for t in waiting {
        let got = t.await.unwrap();
        assert_eq!(got.len(), 1, "every waiting claim got one request");
        assert!(claimed.insert(id(&got[0])), "no request is claimed twice");
    }
    assert_eq!(claimed, ids.into_iter().collect::<HashSet<_>>());
}
