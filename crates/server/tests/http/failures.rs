//! Fail (backoff, dead-letter, fallback) and the batch settlements.

use coatcheck_testkit::{assert_problem, TestServer};
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn a_retryable_failure_goes_back_to_the_queue_after_a_backoff() {
    let s = TestServer::start().await;
    let id = id(&s.submit("rf", json!({"input": 1})).await);
    let c = claim_one(&s, "rf", 30.0).await;
    let err = json!({"code": "flaky", "message": "try again", "details": {"upstream": 503}});
    let r = json_of(fail(&s, &id, &token(&c), json!({"error": err})).await, 200).await;
    assert_eq!(r["status"], "queued");
    assert_eq!(r["attempts"], 1);
    assert_eq!(r["error"], err, "the last error is visible");
    assert_eq!(r["finished_at"], Value::Null);
    // The default policy: 1 s base with up to 50 % jitter.
    let backoff = secs_between(&r["updated_at"], &r["run_after"]);
    assert!((0.49..=1.01).contains(&backoff), "backoff {backoff}");
    assert!(
        s.claim("rf", 1).await.is_empty(),
        "not claimable during the backoff"
    );
    let h = history(&s, &id).await;
    assert_eq!(h[2]["kind"], "attempt_failed");
    assert_eq!(h[2]["run_after"], r["run_after"]);
    assert_eq!(h[2]["error"], err);
    // The old token is fenced now.
    assert_problem(
        complete(&s, &id, &token(&c), json!(1)).await,
        409,
        "lease-lost",
    )
    .await;
    // It comes back for attempt 2 after the backoff.
    let again = claim_wait(&s, "rf", 1, 30.0, 10.0).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["attempt"], 2);
}

#[tokio::test]
async fn not_retryable_or_out_of_attempts_is_dead_lettered() {
    let s = TestServer::start().await;
    let id1 = id(&s.submit("dl", json!({"input": 1, "max_attempts": 5})).await);
    let c = claim_one(&s, "dl", 30.0).await;
    let r = json_of(
        fail(
            &s,
            &id1,
            &token(&c),
            json!({"retryable": false, "error": {"message": "bad input"}}),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(r["status"], "failed");
    assert_eq!(r["attempts"], 1);
    assert_eq!(r["error"], json!({"message": "bad input"}));
    assert!(r["finished_at"].is_string());
    assert_eq!(kinds(&s, &id1).await, ["submitted", "claimed", "failed"]);

    let id2 = id(&s.submit("dl", json!({"input": 2, "max_attempts": 2})).await);
    let c = claim_one(&s, "dl", 30.0).await;
    let r = json_of(
        fail(&s, &id2, &token(&c), json!({"retry_after": 0})).await,
        200,
    )
    .await;
    assert_eq!(r["status"], "queued");
    let c = claim_one(&s, "dl", 30.0).await;
    assert_eq!(c["attempt"], 2);
    let r = json_of(
        fail(&s, &id2, &token(&c), json!({"retry_after": 0})).await,
        200,
    )
    .await;
    assert_eq!(r["status"], "failed", "dead-lettered after max_attempts");
    assert_eq!(r["attempts"], 2);
    assert_eq!(
        kinds(&s, &id2).await,
        [
            "submitted",
            "claimed",
            "attempt_failed",
            "claimed",
            "failed"
        ]
    );
    assert!(s.claim("dl", 5).await.is_empty());
    let list = json_of(s.get("/v1/requests?status=failed").await, 200).await;
    assert_eq!(
        list["requests"].as_array().unwrap().len(),
        2,
        "the dead-letter set"
    );

    // Bad fail bodies.
    let id3 = id(&s.submit("dl", json!({"input": 3})).await);
    let c = claim_one(&s, "dl", 30.0).await;
    let tok = token(&c);
    let path = format!("/v1/requests/{id3}/fail");
    assert_problem(
        s.post(&path, json!({"lease_token": tok})).await,
        400,
        "invalid-json",
    )
    .await;
    assert_problem(
        s.post(&path, json!({"lease_token": tok, "error": {"code": "x"}}))
            .await,
        400,
        "invalid-json",
    )
    .await;
    assert_problem(
        s.post(&path, json!({"lease_token": tok, "error": "x"}))
            .await,
        400,
        "invalid-json",
    )
    .await;
    assert_problem(
        s.post(
            &path,
            json!({"lease_token": tok, "error": {"message": "m"}, "retryable": "no"}),
        )
        .await,
        400,
        "invalid-json",
    )
    .await;
    let p = assert_problem(
        fail(&s, &id3, &tok, json!({"retry_after": -1})).await,
        400,
        "invalid-request",
    )
    .await;
    assert_eq!(p.extensions["field"], "retry_after");
    assert_eq!(
        get_req(&s, &id3).await["status"],
        "running",
        "nothing changed"
    );
}

#[tokio::test]
async fn a_dead_lettered_request_with_a_fallback_queue_submits_a_linked_request() {
    let s = TestServer::start().await;
    let body = json!({
        "input": {"prompt": "hi"}, "max_attempts": 1, "fallback_queue": "big-model", "correlation_id": "c-7",
        "metadata": {"t": "1"}, "reply_to": {"channel": "answers"}, "priority": 4,
    });
    let first = id(&s.submit("small-model", body).await);
    let c = claim_one(&s, "small-model", 30.0).await;
    let r = json_of(fail(&s, &first, &token(&c), json!({})).await, 200).await;
    assert_eq!(r["status"], "failed");
    let fb = r["fallback_request_id"]
        .as_str()
        .expect("fallback_request_id")
        .to_string();
    let f = get_req(&s, &fb).await;
    assert_eq!(f["queue"], "big-model");
    assert_eq!(f["status"], "queued");
    assert_eq!(f["fallback_of"], first.as_str());
    assert_eq!(f["input"], json!({"prompt": "hi"}));
    assert_eq!(f["correlation_id"], "c-7");
    assert_eq!(f["metadata"], json!({"t": "1"}));
    assert_eq!(f["reply_to"], json!({"channel": "answers"}));
    assert_eq!(f["fallback_queue"], Value::Null, "no endless chains");
    let h = history(&s, &first).await;
    let last = h.last().unwrap();
    assert_eq!(last["kind"], "fallback_submitted");
    assert_eq!(last["fallback_request_id"], fb.as_str());
    // The fallback is claimable in its queue, and wakes a waiting claim.
    let c = claim_one(&s, "big-model", 30.0).await;
    assert_eq!(c["id"], fb.as_str());
    assert_eq!(c["correlation_id"], "c-7");
    // Redriven, it is a fresh start: the link is cleared, and dead-lettering
    // again hands it to a new fallback.
    let r = json_of(
        s.post(&format!("/v1/requests/{first}/redrive"), json!({}))
            .await,
        200,
    )
    .await;
    assert_eq!(r["fallback_request_id"], Value::Null);
    let c = claim_one(&s, "small-model", 30.0).await;
    let r = json_of(fail(&s, &first, &token(&c), json!({})).await, 200).await;
    let fb2 = r["fallback_request_id"]
        .as_str()
        .expect("a second fallback")
        .to_string();
    assert_ne!(fb2, fb);
    assert_eq!(get_req(&s, &fb2).await["fallback_of"], first.as_str());
    // A retryable failure with attempts left does not fall back.
    let second = id(&s
        .submit(
            "small-model",
            json!({"input": 1, "max_attempts": 2, "fallback_queue": "big-model"}),
        )
        .await);
    let c = claim_one(&s, "small-model", 30.0).await;
    let r = json_of(fail(&s, &second, &token(&c), json!({})).await, 200).await;
    assert_eq!(r["status"], "queued");
    assert_eq!(r["fallback_request_id"], Value::Null);
}

#[tokio::test]
async fn settlements_with_return_minimal_leave_the_requests_out() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(id(&s.submit("slim", json!({"input": i})).await));
    }
    let c = claim_wait(&s, "slim", 3, 30.0, 0.0).await;
    let items = json!([
        {"id": ids[0], "lease_token": token(&c[0]), "output": {"big": "x".repeat(1000)}},
        {"id": ids[1], "lease_token": token(&c[1]), "error": {"message": "later"}},
        {"id": ids[2], "lease_token": "00000000000000000000000000000000", "output": 1},
    ]);
    let resp = s
        .http()
        .post(s.url("/v1/queues/slim/settlements"))
        .header("prefer", "respond-async, return=minimal")
        .json(&json!({"items": items}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["preference-applied"], "return=minimal");
    let v = json_of(resp, 200).await;
    let out = v["items"].as_array().unwrap();
    assert_eq!(
        out.iter()
            .map(|i| i["status"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [200, 200, 409]
    );
    for item in out {
        assert!(item.get("request").is_none(), "{item}");
    }
    assert_eq!(out[0]["request_status"], "succeeded");
    assert_eq!(out[1]["request_status"], "queued", "a retry");
    assert!(out[2]["problem"]["type"]
        .as_str()
        .unwrap()
        .ends_with("/problems/lease-lost"));
    // The settlements themselves are whole: only the answer is shorter.
    let done = get_req(&s, &ids[0]).await;
    assert_eq!(done["output"]["big"].as_str().map(str::len), Some(1000));
    assert_eq!(get_req(&s, &ids[1]).await["status"], "queued");
    assert_eq!(get_req(&s, &ids[2]).await["status"], "running");
}

#[tokio::test]
async fn settlements_answer_each_item_in_order_and_independently() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(id(&s.submit("batch", json!({"input": i})).await));
    }
    let c = claim_wait(&s, "batch", 4, 30.0, 0.0).await;
    assert_eq!(c.iter().map(id).collect::<Vec<_>>(), ids);
    let unknown = "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77";
    let items = json!([
        {"id": ids[0], "lease_token": token(&c[0]), "output": {"n": 0}},
        {"id": ids[1], "lease_token": token(&c[1]), "error": {"message": "no"}, "retryable": false},
        {"id": ids[2], "lease_token": "00000000000000000000000000000000", "output": "stale"},
        {"id": unknown, "lease_token": token(&c[3]), "output": 1},
        {"id": ids[3], "lease_token": token(&c[3]), "error": {"message": "again"}, "retry_after": 0},
        {"id": ids[0], "lease_token": token(&c[0]), "output": {"n": 0}},
    ]);
    let v = json_of(
        s.post("/v1/queues/batch/settlements", json!({"items": items}))
            .await,
        200,
    )
    .await;
    let out = v["items"].as_array().unwrap();
    let statuses: Vec<u64> = out.iter().map(|i| i["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [200, 200, 409, 404, 200, 200]);
    let out_ids: Vec<&str> = out.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(
        out_ids,
        [&*ids[0], &*ids[1], &*ids[2], unknown, &*ids[3], &*ids[0]]
    );
    assert_eq!(out[0]["request"]["status"], "succeeded");
    assert_eq!(out[0]["request"]["output"], json!({"n": 0}));
    assert_eq!(out[1]["request"]["status"], "failed");
    for item in out.iter().filter(|i| i["status"] == 200) {
        assert_eq!(item["request_status"], item["request"]["status"], "{item}");
    }
    assert!(out[2].get("request_status").is_none());
    assert!(out[2]["problem"]["type"]
        .as_str()
        .unwrap()
        .ends_with("/problems/lease-lost"));
    assert_eq!(out[2]["problem"]["status"], 409);
    assert!(out[2].get("request").is_none());
    assert!(out[3]["problem"]["type"]
        .as_str()
        .unwrap()
        .ends_with("/problems/not-found"));
    assert_eq!(out[4]["request"]["status"], "queued");
    assert_eq!(
        out[5]["request"], out[0]["request"],
        "completing twice is idempotent in a batch too"
    );
    // What the store says afterwards matches each item; the 409 changed nothing.
    assert_eq!(get_req(&s, &ids[0]).await["status"], "succeeded");
    assert_eq!(get_req(&s, &ids[1]).await["status"], "failed");
    let r2 = get_req(&s, &ids[2]).await;
    assert_eq!(r2["status"], "running");
    assert_eq!(r2["output"], Value::Null);
    assert_eq!(get_req(&s, &ids[3]).await["status"], "queued");
    // The untouched lease still works.
    assert_eq!(
        complete(&s, &ids[2], &token(&c[2]), json!(2))
            .await
            .status(),
        200
    );

    // A malformed id, or a request of another queue, is that item's 404.
    let elsewhere = id(&s.submit("other", json!({"input": 1})).await);
    let oc = claim_one(&s, "other", 30.0).await;
    let v = json_of(
        s.post(
            "/v1/queues/batch/settlements",
            json!({"items": [
                {"id": "nope", "lease_token": "t", "output": 1},
                {"id": elsewhere, "lease_token": token(&oc), "output": 1},
                {"id": ids[2], "lease_token": token(&c[2]), "output": "again"},
            ]}),
        )
        .await,
        200,
    )
    .await;
    let statuses: Vec<u64> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [404, 404, 200]);
    assert_eq!(
        get_req(&s, &elsewhere).await["status"],
        "running",
        "not settled through another queue"
    );
    // An output of `null` is an output, as in a single complete.
    let nothing = id(&s.submit("batch-void", json!({"input": "void"})).await);
    let nc = claim_one(&s, "batch-void", 30.0).await;
    assert_eq!(id(&nc), nothing);
    let v = json_of(
        s.post(
            "/v1/queues/batch-void/settlements",
            json!({"items": [{"id": nothing, "lease_token": token(&nc), "output": null}]}),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(v["items"][0]["status"], 200, "{v}");
    let done = get_req(&s, &nothing).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["output"], Value::Null);

    // An item with both (or neither) output and error refuses the whole batch.
    for (bad, field) in [
        (
            json!({"id": ids[3], "lease_token": "t", "output": 1, "error": {"message": "m"}}),
            "items[1]",
        ),
        (json!({"id": ids[3], "lease_token": "t"}), "items[1]"),
        (
            json!({"id": ids[3], "lease_token": ""}),
            "items[1].lease_token",
        ),
    ] {
        let body =
            json!({"items": [{"id": elsewhere, "lease_token": token(&oc), "output": 1}, bad]});
        let p = assert_problem(
            s.post("/v1/queues/other/settlements", body).await,
            400,
            "invalid-request",
        )
        .await;
        assert_eq!(p.extensions["field"], field);
    }
    assert_eq!(
        get_req(&s, &elsewhere).await["status"],
        "running",
        "a refused batch settles nothing"
    );

    // 0 or 101 items, or a body of the wrong shape: 400.
    let item = json!({"id": ids[0], "lease_token": "t", "output": 1});
    let p = assert_problem(
        s.post("/v1/queues/batch/settlements", json!({"items": []}))
            .await,
        400,
        "invalid-request",
    )
    .await;
    assert_eq!(p.extensions["field"], "items");
    let many: Vec<Value> = (0..101).map(|_| item.clone()).collect();
    assert_problem(
        s.post("/v1/queues/batch/settlements", json!({"items": many}))
            .await,
        400,
        "invalid-request",
    )
    .await;
    let hundred: Vec<Value> = (0..100).map(|_| item.clone()).collect();
    assert_eq!(
        s.post("/v1/queues/batch/settlements", json!({"items": hundred}))
            .await
            .status(),
        200
    );
    assert_problem(
        s.post("/v1/queues/batch/settlements", json!({})).await,
        400,
        "invalid-json",
    )
    .await;
    assert_problem(
        s.post(
            "/v1/queues/batch/settlements",
            json!({"items": [{"id": 1}]}),
        )
        .await,
        400,
        "invalid-json",
    )
    .await;
    assert_problem(
        s.post("/v1/queues/a%20b/settlements", json!({"items": [item]}))
            .await,
        400,
        "invalid-request",
    )
    .await;
}
