//! Reply channels over HTTP: long-poll receive with `max`, `wait` and
//! `visibility`, ack by token, redelivery, replies for every terminal
//! status, the channel SSE stream (with and without `auto_ack`), and the
//! 400s of bad input.

use std::time::{Duration, Instant};

use coatcheck_testkit::{assert_problem, TestServer};
use serde_json::{json, Value};

use crate::helpers::*;
use crate::replies_sse::SseReader;

const SOON: Duration = Duration::from_secs(5);

/// `GET /v1/channels/{ch}/messages?{query}`: the messages (asserting 200).
async fn recv(s: &TestServer, ch: &str, query: &str) -> Vec<Value> {
    let v = json_of(
        s.get(&format!("/v1/channels/{ch}/messages?{query}")).await,
        200,
    )
    .await;
    v["messages"].as_array().cloned().expect("messages array")
}

/// `POST /v1/channels/{ch}/ack` (asserting 200): the answer.
async fn ack(s: &TestServer, ch: &str, tokens: &[&str]) -> Value {
    json_of(
        s.post(
            &format!("/v1/channels/{ch}/ack"),
            json!({"ack_tokens": tokens}),
        )
        .await,
        200,
    )
    .await
}

fn tok(m: &Value) -> &str {
    m["ack_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no ack_token in {m}"))
}

/// Submits to `queue` replying to channel `ch` with `extra` fields; returns the id.
async fn submit_replying(s: &TestServer, queue: &str, ch: &str, extra: Value) -> String {
    let mut body = json!({"input": {"n": 1}, "reply_to": {"channel": ch}});
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    id(&s.submit(queue, body).await)
}

/// Submits, claims and completes a request replying to `ch`; returns it.
async fn completed(s: &TestServer, queue: &str, ch: &str, output: Value) -> Value {
    let id = submit_replying(s, queue, ch, json!({})).await;
    let c = claim_one(s, queue, 30.0).await;
    json_of(complete(s, &id, &token(&c), output).await, 200).await
}

#[tokio::test]
async fn a_completed_requests_reply_arrives_with_every_field() {
    let s = TestServer::start().await;
    let id = submit_replying(&s, "ch-q", "c1", json!({"correlation_id": "order-42"})).await;
    let c = claim_one(&s, "ch-q", 30.0).await;
    assert!(
        recv(&s, "c1", "wait=0").await.is_empty(),
        "no reply before the end"
    );
    let done = json_of(complete(&s, &id, &token(&c), json!({"x": 1})).await, 200).await;

    let got = recv(&s, "c1", "wait=5").await;
    assert_eq!(got.len(), 1, "{got:?}");
    let m = &got[0];
    let mut keys: Vec<&str> = m
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "ack_token",
            "correlation_id",
            "delivery_count",
            "error",
            "finished_at",
            "message_id",
            "output",
            "queue",
            "request_id",
            "status"
        ]
    );
    assert!(m["message_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(m["request_id"], id.as_str());
    assert_eq!(m["correlation_id"], "order-42");
    assert_eq!(m["queue"], "ch-q");
    assert_eq!(m["status"], "succeeded");
    assert_eq!(m["output"], json!({"x": 1}));
    assert_eq!(m["error"], Value::Null);
    assert_eq!(ts(&m["finished_at"]), ts(&done["finished_at"]));
    assert_eq!(m["delivery_count"], 1);
    assert!(!tok(m).is_empty());
    // The shared wire type (what the SDK reads) reads it back, output included.
    let text = json!({ "messages": got }).to_string();
    let typed: coatcheck_core::wire::ChannelMessages = serde_json::from_str(&text).expect("typed");
    let out = typed.messages[0]
        .message
        .output
        .as_ref()
        .map(|o| o.get().to_string());
    assert_eq!(out.as_deref(), Some(r#"{"x":1}"#));

    let h = history(&s, &id).await;
    let last = h.last().expect("events");
    assert_eq!(
        (last["kind"].as_str(), last["target"].as_str()),
        (Some("reply_delivered"), Some("channel"))
    );

    let a = ack(&s, "c1", &[tok(m)]).await;
    assert_eq!(a, json!({"acked": [tok(m)], "not_found": []}));
    assert!(recv(&s, "c1", "wait=0&visibility=0.001").await.is_empty());
    // Another channel, or the same name later, holds nothing of it.
    assert!(recv(&s, "c2", "wait=0").await.is_empty());
}

#[tokio::test]
async fn a_long_poll_wakes_promptly_when_a_reply_arrives() {
    let s = TestServer::start().await;
    let id = submit_replying(&s, "lp-q", "lp", json!({})).await;
    let c = claim_one(&s, "lp-q", 30.0).await;
    let start = Instant::now();
    let (got, completed_at) = tokio::join!(recv(&s, "lp", "wait=20"), async {
        // Let the long-poll park first; its wake-up is what is measured.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(complete(&s, &id, &token(&c), json!(1)).await.status(), 200);
        Instant::now()
    });
    let woke = start.elapsed();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["request_id"], id.as_str());
    let lag = woke.saturating_sub(completed_at - start);
    assert!(
        lag < Duration::from_secs(1),
        "woke {lag:?} after the completion"
    );
    assert!(
        woke < Duration::from_secs(5),
        "not at the end of the wait: {woke:?}"
    );
}

#[tokio::test]
async fn an_unacked_message_is_redelivered_after_its_visibility() {
    let s = TestServer::start().await;
    let req = completed(&s, "vis-q", "vis", json!(7)).await;
    // Taken before the receive is sent: the server hides the message from
    // its own "now", which is no earlier than this (taken after the answer,
    // a slow answer under load made the redelivery look early).
    let t0 = Instant::now();
    let first = recv(&s, "vis", "wait=5&visibility=0.5").await;
    assert_eq!(first.len(), 1);
    assert!(recv(&s, "vis", "wait=0").await.is_empty(), "hidden");

    let again = recv(&s, "vis", "wait=10&visibility=0.5").await;
    let took = t0.elapsed();
    assert_eq!(again.len(), 1);
    assert!(
        took >= Duration::from_millis(450),
        "not before its visibility: {took:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "about 0.5 s later: {took:?}"
    );
    let (a, b) = (&first[0], &again[0]);
    assert_eq!(b["message_id"], a["message_id"], "the same message");
    assert_eq!(b["request_id"], req["id"]);
    assert_ne!(tok(b), tok(a), "a fresh ack token");
    assert_eq!(
        (a["delivery_count"].as_u64(), b["delivery_count"].as_u64()),
        (Some(1), Some(2))
    );

    // The first token is stale now; the current one removes it.
    let res = ack(&s, "vis", &[tok(a), tok(b)]).await;
    assert_eq!(res, json!({"acked": [tok(b)], "not_found": [tok(a)]}));
    assert!(
        recv(&s, "vis", "wait=1").await.is_empty(),
        "acked: gone for good"
    );
}

#[tokio::test]
async fn max_limits_a_receive_and_messages_come_oldest_first() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(id(
            &completed(&s, &format!("max-q{i}"), "mx", json!(i)).await
        ));
    }
    let got = recv(&s, "mx", "max=2&wait=5").await;
    let got_ids: Vec<&str> = got
        .iter()
        .map(|m| m["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(got_ids, [ids[0].as_str(), ids[1].as_str()]);
    let got = recv(&s, "mx", "wait=5").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["request_id"], ids[2].as_str());
}

#[tokio::test]
async fn failed_cancelled_and_expired_requests_reply_too() {
    let s = TestServer::start().await;
    let failed = submit_replying(&s, "end-f", "ends", json!({"max_attempts": 1})).await;
    let c = claim_one(&s, "end-f", 30.0).await;
    let r = fail(&s, &failed, &token(&c), json!({"retryable": false})).await;
    assert_eq!(r.status(), 200);
    let cancelled = submit_replying(&s, "end-c", "ends", json!({})).await;
    let r = s
        .http()
        .delete(s.url(&format!("/v1/requests/{cancelled}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let expired = submit_replying(&s, "end-e", "ends", json!({"timeout": 0.3})).await;

    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < 3 && start.elapsed() < Duration::from_secs(10) {
        got.extend(recv(&s, "ends", "wait=5").await);
    }
    assert_eq!(got.len(), 3, "{got:?}");
    for (id, status, code) in [
        (&failed, "failed", "boom"),
        (&cancelled, "cancelled", "cancelled"),
        (&expired, "expired", "deadline_exceeded"),
    ] {
        let m = got
            .iter()
            .find(|m| m["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no reply for the {status} request: {got:?}"));
        assert_eq!(
            (m["status"].as_str(), m["error"]["code"].as_str()),
            (Some(status), Some(code)),
            "{m}"
        );
        assert_eq!(m["output"], Value::Null);
        assert_eq!(
            kinds(&s, id).await.last().map(String::as_str),
            Some("reply_delivered")
        );
    }
    let tokens: Vec<&str> = got.iter().map(tok).collect();
    assert_eq!(
        ack(&s, "ends", &tokens).await["acked"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

/// Opens the channel's event stream with `query`.
async fn channel_stream(s: &TestServer, ch: &str, query: &str) -> SseReader {
    let resp = s.get(&format!("/v1/channels/{ch}/events?{query}")).await;
    SseReader::new(resp)
}

#[tokio::test]
async fn channel_events_with_auto_ack_deliver_and_remove() {
    let s = TestServer::start().await;
    let mut es = channel_stream(&s, "auto", "auto_ack=true").await;
    let a = completed(&s, "auto-q", "auto", json!("a")).await;
    let b = completed(&s, "auto-q", "auto", json!("b")).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let e = es.next(SOON).await;
        assert_eq!(e.event, "message");
        let m = e.json();
        assert_eq!(
            e.id.as_deref(),
            m["message_id"].as_str(),
            "id: the message id"
        );
        assert_eq!(m["status"], "succeeded");
        assert_eq!(m["delivery_count"], 1);
        seen.push(m["request_id"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, [id(&a), id(&b)]);
    drop(es);
    assert!(
        recv(&s, "auto", "wait=0").await.is_empty(),
        "auto-acked: removed"
    );
    assert!(recv(&s, "auto", "wait=1&visibility=0.001").await.is_empty());
}

#[tokio::test]
async fn channel_events_without_auto_ack_redeliver_until_acked() {
    let s = TestServer::start().await;
    let mut es = channel_stream(&s, "manual", "visibility=0.5").await;
    let a = completed(&s, "man-q", "manual", json!("a")).await;
    let ea = es.next(SOON).await;
    let ma = ea.json();
    assert_eq!(ma["request_id"], a["id"]);
    assert_eq!(
        ack(&s, "manual", &[tok(&ma)]).await["acked"],
        json!([tok(&ma)])
    );

    let b = completed(&s, "man-q", "manual", json!("b")).await;
    let mb = es.next(SOON).await.json();
    assert_eq!(
        (mb["request_id"].clone(), mb["delivery_count"].clone()),
        (b["id"].clone(), json!(1))
    );
    let t0 = Instant::now();
    // Not acked: the same stream gets it again once its visibility ran out.
    let again = es.next(SOON).await;
    let took = t0.elapsed();
    let mb2 = again.json();
    assert_eq!(mb2["message_id"], mb["message_id"]);
    assert_eq!(mb2["delivery_count"], 2);
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert_eq!(
        ack(&s, "manual", &[tok(&mb2)]).await["acked"],
        json!([tok(&mb2)])
    );
    es.expect_quiet(Duration::from_millis(1200)).await;
    drop(es);
    assert!(recv(&s, "manual", "wait=0").await.is_empty());
}

#[tokio::test]
async fn bad_channel_input_is_a_400_problem() {
    let s = TestServer::start().await;
    let long = "c".repeat(129);
    for name in ["bad%20name", "-lead", ".dot", long.as_str(), "%C3%BC"] {
        for path in ["messages", "events"] {
            let p = assert_problem(
                s.get(&format!("/v1/channels/{name}/{path}")).await,
                400,
                "invalid-request",
            )
            .await;
            assert_eq!(p.extensions["field"], "channel", "{name} {path}");
        }
        let body = json!({"ack_tokens": ["t"]});
        let resp = s.post(&format!("/v1/channels/{name}/ack"), body).await;
        assert_problem(resp, 400, "invalid-request").await;
    }
    assert_eq!(
        recv(&s, &"c".repeat(128), "wait=0").await.len(),
        0,
        "128 characters are fine"
    );

    for (query, field) in [
        ("max=0", Some("max")),
        ("max=101", Some("max")),
        ("max=-1", None),
        ("max=abc", None),
        ("visibility=0", Some("visibility")),
        ("visibility=-1", Some("visibility")),
        ("visibility=abc", None),
        ("wait=-1", Some("wait")),
        ("wait=nan", Some("wait")),
    ] {
        let resp = s.get(&format!("/v1/channels/ok/messages?{query}")).await;
        let p = assert_problem(resp, 400, "invalid-request").await;
        if let Some(f) = field {
            assert_eq!(p.extensions["field"], f, "{query}");
        }
    }
    for query in ["visibility=0", "auto_ack=maybe"] {
        let resp = s.get(&format!("/v1/channels/ok/events?{query}")).await;
        assert_problem(resp, 400, "invalid-request").await;
    }

    let many: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
    for body in [
        json!({"ack_tokens": []}),
        json!({"ack_tokens": many}),
        json!({"ack_tokens": ["a\u{1}"]}),
    ] {
        assert_problem(
            s.post("/v1/channels/ok/ack", body).await,
            400,
            "invalid-request",
        )
        .await;
    }
    for body in [json!({}), json!({"ack_tokens": "t"}), json!([1])] {
        assert_problem(
            s.post("/v1/channels/ok/ack", body).await,
            400,
            "invalid-json",
        )
        .await;
    }
    // Tokens that match nothing are reported, not refused.
    assert_eq!(
        ack(&s, "ok", &["nope"]).await,
        json!({"acked": [], "not_found": ["nope"]})
    );
    // A large max is clamped only by the 100 limit; a large wait by the cap.
    assert!(recv(&s, "ok", "max=100&wait=0").await.is_empty());
}
