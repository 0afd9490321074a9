//! The status monitor (`GET /v1/requests/{id}`, `?wait=N`), `/result`,
//! `/history` across a whole life, and `DELETE` (cancel).

use std::sync::Arc;
use std::time::Duration;

use coatcheck_testkit::{assert_problem, TestServer};
use serde_json::{json, Value};

use crate::helpers::*;

const UNKNOWN: &str = "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77";

#[tokio::test]
async fn status_carries_retry_after_until_terminal() {
    let s = TestServer::start().await;
    let req = s.submit("st", json!({"input": 1})).await;
    let id = id(&req);
    let resp = s.get(&format!("/v1/requests/{id}")).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    let c = claim_one(&s, "st", 30.0).await;
    let resp = s.get(&format!("/v1/requests/{id}")).await;
    assert!(
        resp.headers().get("retry-after").is_some(),
        "running: Retry-After"
    );
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["status"], "running");
    assert_eq!(r["attempts"], 1);
    assert_eq!(complete(&s, &id, &token(&c), json!(1)).await.status(), 200);
    let resp = s.get(&format!("/v1/requests/{id}")).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().get("retry-after").is_none(),
        "terminal: no Retry-After"
    );
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["status"], "succeeded");
    assert!(r["finished_at"].is_string());
}

#[tokio::test]
async fn status_long_poll_returns_as_soon_as_the_request_finishes() {
    let s = Arc::new(TestServer::start().await);
    let rid = id(&s.submit("lp", json!({"input": 1})).await);
    let w = s.clone();
    let worker = tokio::spawn(async move {
        let c = claim_one(&w, "lp", 30.0).await;
        tokio::time::sleep(Duration::from_millis(300)).await; // the "work"
        assert_eq!(
            complete(&w, &id(&c), &token(&c), json!("ok"))
                .await
                .status(),
            200
        );
    });
    let (resp, took) = timed(s.get(&format!("/v1/requests/{rid}?wait=20"))).await;
    let r = json_of(resp, 200).await;
    assert_eq!(r["status"], "succeeded");
    assert!(
        took >= Duration::from_millis(250),
        "it waited for the worker: {took:?}"
    );
    assert!(
        took < Duration::from_secs(8),
        "it returned well before 20 s: {took:?}"
    );
    worker.await.unwrap();
    // On a terminal request it answers at once.
    let (resp, took) = timed(s.get(&format!("/v1/requests/{rid}?wait=20"))).await;
    assert_eq!(resp.status(), 200);
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn status_long_poll_answers_the_state_after_n_seconds() {
    let s = TestServer::start().await;
    let id = id(&s.submit("lp", json!({"input": 1})).await);
    let (resp, took) = timed(s.get(&format!("/v1/requests/{id}?wait=1"))).await;
    assert!(resp.headers().get("retry-after").is_some());
    let r = json_of(resp, 200).await;
    assert_eq!(r["status"], "queued");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Fractions are allowed; 0 is "no wait".
    let (resp, took) = timed(s.get(&format!("/v1/requests/{id}?wait=0.3"))).await;
    assert_eq!(resp.status(), 200);
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let (resp, took) = timed(s.get(&format!("/v1/requests/{id}?wait=0"))).await;
    assert_eq!(resp.status(), 200);
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn a_wait_above_the_cap_is_clamped_and_a_negative_wait_is_400() {
    let s = TestServer::start_with(|c| c.max_wait = Duration::from_secs(1)).await;
    let id = id(&s.submit("cap", json!({"input": 1})).await);
    let (resp, took) = timed(s.get(&format!("/v1/requests/{id}?wait=100"))).await;
    assert_eq!(resp.status(), 200, "clamped, not refused");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // The claim long-poll is clamped the same way.
    let (got, took) = timed(claim_wait(&s, "empty", 1, 30.0, 100.0)).await;
    assert!(got.is_empty());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    for bad in ["-1", "-0.5", "x", "NaN", "inf", ""] {
        let resp = s.get(&format!("/v1/requests/{id}?wait={bad}")).await;
        assert_problem(resp, 400, "invalid-request").await;
    }
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_404_problems() {
    let s = TestServer::start().await;
    for id in [
        UNKNOWN,
        "not-an-id",
        "0193F2C4-7B1E-7C4A-9F0E-3B5D2A1C9E77x",
        &"9".repeat(500),
        "%00",
        "%C3%A4",
        "..%2F..%2Fetc",
    ] {
        for suffix in ["", "/result", "/history"] {
            assert_problem(
                s.get(&format!("/v1/requests/{id}{suffix}")).await,
                404,
                "not-found",
            )
            .await;
        }
        assert_problem(
            s.get(&format!("/v1/requests/{id}?wait=1")).await,
            404,
            "not-found",
        )
        .await;
    }
}

#[tokio::test]
async fn result_is_202_then_200_with_the_raw_output() {
    let s = TestServer::start().await;
    let rid = id(&s.submit("res", json!({"input": 1})).await);
    let resp = s.get(&format!("/v1/requests/{rid}/result")).await;
    assert_eq!(resp.status(), 202);
    assert!(resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse::<u64>()
        .is_ok());
    assert_eq!(
        resp.headers()["location"],
        format!("/v1/requests/{rid}").as_str()
    );
    let c = claim_one(&s, "res", 30.0).await;
    assert_eq!(
        s.get(&format!("/v1/requests/{rid}/result")).await.status(),
        202,
        "running is not finished"
    );
    assert_eq!(
        complete(&s, &rid, &token(&c), json!([1, {"x": "y"}, null]))
            .await
            .status(),
        200
    );
    let resp = s.get(&format!("/v1/requests/{rid}/result")).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let out: Value = resp.json().await.unwrap();
    assert_eq!(
        out,
        json!([1, {"x": "y"}, null]),
        "the output as is, not wrapped"
    );
    // A scalar output, and a missing output (null).
    for (output, body) in [(Some(json!("hi")), "\"hi\""), (None, "null")] {
        let id = id(&s.submit("res", json!({"input": 1})).await);
        let c = claim_one(&s, "res", 30.0).await;
        let mut b = json!({"lease_token": token(&c)});
        if let Some(o) = output {
            b["output"] = o;
        }
        assert_eq!(
            s.post(&format!("/v1/requests/{id}/complete"), b)
                .await
                .status(),
            200
        );
        let text = s
            .get(&format!("/v1/requests/{id}/result"))
            .await
            .text()
            .await
            .unwrap();
        assert_eq!(text, body);
    }
}

#[tokio::test]
async fn result_is_409_with_status_and_error_when_it_did_not_succeed() {
    let s = TestServer::with_manual_clock().await;
    // failed
    let failed = id(&s.submit("res", json!({"input": 1})).await);
    let c = claim_one(&s, "res", 30.0).await;
    let resp = fail(&s, &failed, &token(&c), json!({"retryable": false, "error": {"code": "bad", "message": "no", "details": {"line": 3}}})).await;
    assert_eq!(resp.status(), 200);
    // cancelled
    let cancelled = id(&s.submit("res", json!({"input": 1})).await);
    assert_eq!(
        s.http()
            .delete(s.url(&format!("/v1/requests/{cancelled}")))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // expired
    let expired = id(&s.submit("res", json!({"input": 1, "timeout": 10})).await);
    s.advance(Duration::from_secs(11));
    wait_terminal(&s, &expired).await;

    for (id, status, code) in [
        (failed, "failed", "bad"),
        (cancelled, "cancelled", "cancelled"),
        (expired, "expired", "deadline_exceeded"),
    ] {
        let p = assert_problem(
            s.get(&format!("/v1/requests/{id}/result")).await,
            409,
            "request-not-succeeded",
        )
        .await;
        assert_eq!(p.extensions["request_status"], status);
        assert_eq!(p.extensions["error"]["code"], code, "{status}");
        assert!(p.extensions["error"]["message"].is_string());
        if status == "failed" {
            assert_eq!(p.extensions["error"]["details"], json!({"line": 3}));
        }
    }
}

#[tokio::test]
async fn history_records_every_kind_across_a_life() {
    let s = TestServer::with_manual_clock().await;
    let body = json!({"input": {"n": 1}, "max_attempts": 3, "fallback_queue": "fb", "correlation_id": "life"});
    let a = id(&s.submit("life", body).await);
    // Attempt 1: progress, then a retryable failure.
    let c = claim_one(&s, "life", 30.0).await;
    let hb = heartbeat(
        &s,
        &a,
        json!({"lease_token": token(&c), "progress": {"pct": 50}}),
    )
    .await;
    assert_eq!(hb.status(), 200);
    assert_eq!(
        fail(&s, &a, &token(&c), json!({"retry_after": 0}))
            .await
            .status(),
        200
    );
    // Attempt 2: the worker goes silent; the lease runs out.
    let c = claim_one(&s, "life", 30.0).await;
    assert_eq!(c["attempt"], 2);
    s.advance(Duration::from_secs(31));
    // Attempt 3 (the claim long-poll wakes when the reaper requeues it): not retryable → failed → fallback.
    let c = claim_one(&s, "life", 30.0).await;
    assert_eq!(c["attempt"], 3);
    assert_eq!(
        fail(&s, &a, &token(&c), json!({"retryable": false}))
            .await
            .status(),
        200
    );
    let r = get_req(&s, &a).await;
    assert_eq!(r["status"], "failed");
    let fb = r["fallback_request_id"]
        .as_str()
        .expect("fallback created")
        .to_string();
    // Redrive, claim, cancel while running, the worker gives up → cancelled; redrive again.
    assert_eq!(
        s.post(&format!("/v1/requests/{a}/redrive"), json!({}))
            .await
            .status(),
        200
    );
    let c = claim_wait(&s, "life", 1, 30.0, 10.0).await;
    assert_eq!(c.len(), 1, "the redriven request is claimable");
    assert_eq!(c[0]["id"], a.as_str());
    assert_eq!(
        s.http()
            .delete(s.url(&format!("/v1/requests/{a}")))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(fail(&s, &a, &token(&c[0]), json!({})).await.status(), 200);
    assert_eq!(
        s.post(&format!("/v1/requests/{a}/redrive"), json!({}))
            .await
            .status(),
        200
    );

    let h = history(&s, &a).await;
    let ks: Vec<&str> = h.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        ks,
        [
            "submitted",
            "claimed",
            "progress",
            "attempt_failed",
            "claimed",
            "lease_expired",
            "claimed",
            "failed",
            "fallback_submitted",
            "redriven",
            "claimed",
            "cancel_requested",
            "cancelled",
            "redriven",
        ]
    );
    for (i, e) in h.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "seq numbers 1, 2, 3 …");
        ts(&e["at"]);
    }
    for w in h.windows(2) {
        assert!(ts(&w[0]["at"]) <= ts(&w[1]["at"]), "oldest first");
    }
    assert_eq!(h[1]["worker_id"], "w-test");
    assert_eq!(h[1]["attempt"], 1);
    assert_eq!(h[2]["progress"], json!({"pct": 50}));
    assert_eq!(h[3]["error"]["code"], "boom");
    assert!(h[3]["run_after"].is_string());
    assert_eq!(h[5]["next_status"], "queued");
    assert_eq!(h[5]["attempt"], 2);
    assert_eq!(h[7]["attempt"], 3);
    assert_eq!(h[8]["fallback_request_id"], fb.as_str());
    assert_eq!(h[8]["queue"], "fb");
    assert_eq!(h[9]["from"], "failed");
    assert_eq!(h[13]["from"], "cancelled");
    assert_eq!(kinds(&s, &fb).await, ["submitted", "fallback_of"]);

    // Another life: expired by its deadline, redriven, then succeeded.
    let b = id(&s.submit("life2", json!({"input": 2, "timeout": 10})).await);
    s.advance(Duration::from_secs(11));
    assert_eq!(wait_terminal(&s, &b).await["status"], "expired");
    assert_eq!(
        s.post(&format!("/v1/requests/{b}/redrive"), json!({}))
            .await
            .status(),
        200
    );
    let c = claim_one(&s, "life2", 30.0).await;
    assert_eq!(complete(&s, &b, &token(&c), json!(2)).await.status(), 200);
    let h = history(&s, &b).await;
    let ks: Vec<&str> = h.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        ks,
        ["submitted", "expired", "redriven", "claimed", "succeeded"]
    );
    assert_eq!(h[1]["from"], "queued");
    assert_eq!(h[2]["from"], "expired");
}

async fn delete(s: &TestServer, id: &str) -> reqwest::Response {
    s.http()
        .delete(s.url(&format!("/v1/requests/{id}")))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn cancel_a_queued_request_is_200_and_final() {
    let s = TestServer::start().await;
    let id = id(&s.submit("cx", json!({"input": 1})).await);
    let r = json_of(delete(&s, &id).await, 200).await;
    assert_eq!(r["status"], "cancelled");
    assert_eq!(r["error"]["code"], "cancelled");
    assert!(r["finished_at"].is_string());
    assert!(
        s.claim("cx", 10).await.is_empty(),
        "a cancelled request is not claimable"
    );
    let p = assert_problem(delete(&s, &id).await, 409, "wrong-state").await;
    assert_eq!(p.extensions["request_status"], "cancelled");
    assert_eq!(kinds(&s, &id).await, ["submitted", "cancelled"]);
    assert_problem(delete(&s, UNKNOWN).await, 404, "not-found").await;
    assert_problem(delete(&s, "nope").await, 404, "not-found").await;
}

#[tokio::test]
async fn cancel_a_running_request_asks_the_worker() {
    let s = TestServer::start().await;
    let id = id(&s.submit("cx", json!({"input": 1})).await);
    let c = claim_one(&s, "cx", 30.0).await;
    let hb = json_of(
        heartbeat(&s, &id, json!({"lease_token": token(&c)})).await,
        200,
    )
    .await;
    assert_eq!(hb["cancel_requested"], false);
    let r = json_of(delete(&s, &id).await, 202).await;
    assert_eq!(r["status"], "running");
    assert_eq!(r["cancel_requested"], true);
    // Asking again changes nothing more.
    assert_eq!(delete(&s, &id).await.status(), 202);
    let hb = json_of(
        heartbeat(&s, &id, json!({"lease_token": token(&c)})).await,
        200,
    )
    .await;
    assert_eq!(
        hb["cancel_requested"], true,
        "the worker learns it on its next heartbeat"
    );
    // The worker gives up: cancelled, whatever it says about retrying.
    let r = json_of(
        fail(&s, &id, &token(&c), json!({"retryable": true})).await,
        200,
    )
    .await;
    assert_eq!(r["status"], "cancelled");
    assert_eq!(r["error"]["code"], "cancelled");
    assert_eq!(
        kinds(&s, &id).await,
        ["submitted", "claimed", "cancel_requested", "cancelled"]
    );
    assert_problem(delete(&s, &id).await, 409, "wrong-state").await;
}

#[tokio::test]
async fn a_worker_that_completes_before_giving_up_wins_over_a_cancel() {
    let s = TestServer::start().await;
    let id = id(&s.submit("cx", json!({"input": 1})).await);
    let c = claim_one(&s, "cx", 30.0).await;
    assert_eq!(delete(&s, &id).await.status(), 202);
    let r = json_of(
        complete(&s, &id, &token(&c), json!({"late": "but done"})).await,
        200,
    )
    .await;
    assert_eq!(r["status"], "succeeded");
    assert_eq!(r["output"], json!({"late": "but done"}));
    let p = assert_problem(delete(&s, &id).await, 409, "wrong-state").await;
    assert_eq!(p.extensions["request_status"], "succeeded");
}

#[tokio::test]
async fn a_cancel_requested_request_whose_lease_runs_out_ends_cancelled() {
    let s = TestServer::with_manual_clock().await;
    let id = id(&s.submit("cx", json!({"input": 1, "max_attempts": 5})).await);
    let c = claim_one(&s, "cx", 30.0).await;
    assert_eq!(delete(&s, &id).await.status(), 202);
    s.advance(Duration::from_secs(31));
    let r = wait_terminal(&s, &id).await;
    assert_eq!(
        r["status"], "cancelled",
        "not requeued: the client asked to cancel"
    );
    assert_problem(
        complete(&s, &id, &token(&c), json!(1)).await,
        409,
        "lease-lost",
    )
    .await;
}

#[tokio::test]
async fn a_status_long_poll_is_woken_by_a_cancel() {
    let s = Arc::new(TestServer::start().await);
    let rid = id(&s.submit("cxw", json!({"input": 1})).await);
    let op = s.clone();
    let id2 = rid.clone();
    let cancel = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await; // while the GET waits
        delete(&op, &id2).await.status()
    });
    let (resp, took) = timed(s.get(&format!("/v1/requests/{rid}?wait=20"))).await;
    assert_eq!(cancel.await.unwrap(), 200);
    assert_eq!(json_of(resp, 200).await["status"], "cancelled");
    assert!(took < Duration::from_secs(5), "{took:?}");
}
