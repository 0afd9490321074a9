//! Fallback routing: a request with `fallback_queue` that dead-letters is
//! re-submitted there (same input, correlation id, reply_to, metadata),
//! linked both ways and recorded in both histories; the reply goes out once,
//! for the last request of the chain.

use std::time::Duration;

use coatcheck_testkit::{assert_problem, TestServer};
use serde_json::{json, Value};

use crate::helpers::*;

async fn recv(s: &TestServer, ch: &str, query: &str) -> Vec<Value> {
    let v = json_of(
        s.get(&format!("/v1/channels/{ch}/messages?{query}")).await,
        200,
    )
    .await;
    v["messages"].as_array().cloned().expect("messages array")
}

/// Submits to `primary` with a fallback to `secondary`, replying to `ch`.
async fn submit_chain(s: &TestServer, ch: &str) -> Value {
    let body = json!({
        "input": {"prompt": "hi"},
        "correlation_id": "chain-1",
        "max_attempts": 1,
        "metadata": {"model": "big"},
        "reply_to": {"channel": ch},
        "fallback_queue": "secondary",
    });
    let req = s.submit("primary", body).await;
    assert_eq!(req["fallback_queue"], "secondary");
    assert_eq!(
        (&req["fallback_of"], &req["fallback_request_id"]),
        (&Value::Null, &Value::Null)
    );
    req
}

/// Dead-letters the primary; checks the link both ways; returns the fallback.
async fn dead_letter(s: &TestServer, first: &str) -> Value {
    let c = claim_one(s, "primary", 30.0).await;
    let r = json_of(
        fail(s, first, &token(&c), json!({"retryable": false})).await,
        200,
    )
    .await;
    assert_eq!(r["status"], "failed");
    let fb_id = r["fallback_request_id"]
        .as_str()
        .expect("a fallback request id")
        .to_string();
    let fb = get_req(s, &fb_id).await;
    assert_eq!(fb["queue"], "secondary");
    assert_eq!(fb["status"], "queued");
    assert_eq!(fb["fallback_of"], first);
    assert_eq!(fb["fallback_queue"], Value::Null);
    assert_eq!(fb["input"], json!({"prompt": "hi"}));
    assert_eq!(fb["correlation_id"], "chain-1");
    assert_eq!(fb["metadata"], json!({"model": "big"}));
    assert_eq!(fb["reply_to"], r["reply_to"]);
    assert_eq!(fb["max_attempts"], 1);

    let h = history(s, first).await;
    let kinds: Vec<&str> = h.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["submitted", "claimed", "failed", "fallback_submitted"]
    );
    let last = h.last().unwrap();
    assert_eq!(
        (last["fallback_request_id"].as_str(), last["queue"].as_str()),
        (Some(fb_id.as_str()), Some("secondary"))
    );
    assert_eq!(kinds_of(s, &fb_id).await, ["submitted", "fallback_of"]);
    fb
}

async fn kinds_of(s: &TestServer, id: &str) -> Vec<String> {
    kinds(s, id).await
}

#[tokio::test]
async fn a_dead_lettered_request_falls_back_and_the_chain_replies_once() {
    let s = TestServer::start().await;
    let first = id(&submit_chain(&s, "fb").await);
    let fb = dead_letter(&s, &first).await;
    let fb_id = id(&fb);
    assert!(
        recv(&s, "fb", "wait=0.3").await.is_empty(),
        "no reply for a request that fell back"
    );

    let c = claim_one(&s, "secondary", 30.0).await;
    assert_eq!(c["id"], fb_id.as_str());
    assert_eq!(c["input"], json!({"prompt": "hi"}));
    assert_eq!(
        complete(&s, &fb_id, &token(&c), json!({"answer": 42}))
            .await
            .status(),
        200
    );

    let got = recv(&s, "fb", "wait=5").await;
    assert_eq!(got.len(), 1, "{got:?}");
    let m = &got[0];
    assert_eq!(
        m["request_id"],
        fb_id.as_str(),
        "the reply is the last request's"
    );
    assert_eq!(
        (m["queue"].as_str(), m["status"].as_str()),
        (Some("secondary"), Some("succeeded"))
    );
    assert_eq!(m["correlation_id"], "chain-1");
    assert_eq!(m["output"], json!({"answer": 42}));
    let acked = json_of(
        s.post(
            "/v1/channels/fb/ack",
            json!({"ack_tokens": [m["ack_token"]]}),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(acked["acked"].as_array().map(Vec::len), Some(1));
    assert!(
        recv(&s, "fb", "wait=0.5").await.is_empty(),
        "exactly one reply"
    );

    assert!(!kinds_of(&s, &first)
        .await
        .contains(&"reply_delivered".to_string()));
    assert_eq!(
        kinds_of(&s, &fb_id).await,
        [
            "submitted",
            "fallback_of",
            "claimed",
            "succeeded",
            "reply_delivered"
        ]
    );
    // The first request stays failed and linked.
    let r = get_req(&s, &first).await;
    assert_eq!(
        (r["status"].as_str(), r["fallback_request_id"].as_str()),
        (Some("failed"), Some(fb_id.as_str()))
    );
}

#[tokio::test]
async fn a_failing_fallback_ends_the_chain_with_its_own_failed_reply() {
    let s = TestServer::start().await;
    let first = id(&submit_chain(&s, "fb2").await);
    let fb_id = id(&dead_letter(&s, &first).await);
    let c = claim_one(&s, "secondary", 30.0).await;
    let r = json_of(fail(&s, &fb_id, &token(&c), json!({})).await, 200).await;
    assert_eq!(r["status"], "failed", "one attempt, used up");
    assert_eq!(
        r["fallback_request_id"],
        Value::Null,
        "a fallback has no fallback"
    );
    let got = recv(&s, "fb2", "wait=5").await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0]["request_id"].as_str(), got[0]["status"].as_str()),
        (Some(fb_id.as_str()), Some("failed"))
    );
    assert_eq!(got[0]["error"]["code"], "boom");
}

#[tokio::test]
async fn a_lease_expiry_dead_letter_falls_back_too() {
    let s = TestServer::start().await;
    let first = id(&submit_chain(&s, "fb3").await);
    claim_one(&s, "primary", 0.3).await;
    // The lease runs out with no attempts left: dead-lettered, then the fallback.
    let r = wait_for_status(&s, &first, "failed", Duration::from_secs(10)).await;
    let fb_id = r["fallback_request_id"]
        .as_str()
        .expect("a fallback")
        .to_string();
    let c = claim_one(&s, "secondary", 30.0).await;
    assert_eq!(c["id"], fb_id.as_str());
    assert_eq!(
        complete(&s, &fb_id, &token(&c), json!(1)).await.status(),
        200
    );
    let got = recv(&s, "fb3", "wait=5").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["request_id"], fb_id.as_str());
    let k = kinds_of(&s, &first).await;
    assert_eq!(
        k,
        [
            "submitted",
            "claimed",
            "lease_expired",
            "failed",
            "fallback_submitted"
        ]
    );
}

#[tokio::test]
async fn a_bad_fallback_queue_is_a_400_problem() {
    let s = TestServer::start().await;
    for bad in [json!("bad name"), json!(""), json!(7)] {
        let body = json!({"input": 1, "fallback_queue": bad});
        let resp = s.post("/v1/queues/primary/requests", body).await;
        let status = resp.status().as_u16();
        assert_eq!(status, 400, "fallback_queue {bad}");
        let p: Value = resp.json().await.unwrap();
        assert!(
            p["type"].as_str().unwrap().contains("/problems/invalid"),
            "{p}"
        );
    }
    let body = json!({"input": 1, "fallback_queue": "bad name"});
    let p = assert_problem(
        s.post("/v1/queues/primary/requests", body).await,
        400,
        "invalid-request",
    )
    .await;
    assert_eq!(p.extensions["field"], "fallback_queue");
}
