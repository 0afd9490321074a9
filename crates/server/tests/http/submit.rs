//! `POST /v1/queues/{queue}/requests`: headers, every optional field,
//! `Prefer: wait=N`, `Idempotency-Key` (also across a restart) and bad input.

use std::sync::Arc;
use std::time::Duration;

use coatcheck_testkit::{assert_problem, TestServer};
use serde_json::{json, Value};

use crate::helpers::*;

async fn post_raw(
    s: &TestServer,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> reqwest::Response {
    let mut b = s.http().post(s.url(path)).body(body.to_string());
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    b.send().await.expect("POST")
}

async fn count_requests(s: &TestServer) -> usize {
    let v = json_of(s.get("/v1/requests?limit=1000").await, 200).await;
    v["requests"].as_array().expect("requests").len()
}

#[tokio::test]
async fn submit_is_202_with_location_operation_location_and_retry_after() {
    let s = TestServer::start_with(|c| c.public_url = Some("https://cc.example.com/".into())).await;
    let resp = s
        .post("/v1/queues/thumbs/requests", json!({"input": {"a": 1}}))
        .await;
    assert_eq!(resp.status(), 202);
    let h = resp.headers().clone();
    let req: Value = resp.json().await.unwrap();
    let id = id(&req);
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(h["location"], format!("/v1/requests/{id}").as_str());
    assert_eq!(
        h["operation-location"],
        format!("https://cc.example.com/v1/requests/{id}").as_str()
    );
    let ra = h["retry-after"].to_str().unwrap();
    assert!(
        ra.parse::<u64>().is_ok(),
        "Retry-After is integer seconds: {ra}"
    );
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));

    // The body is the Request with every field of API.md and its defaults.
    let want = json!({
        "id": id, "queue": "thumbs", "status": "queued", "correlation_id": null, "input": {"a": 1},
        "output": null, "error": null, "progress": null, "priority": 0, "attempts": 0, "max_attempts": 3,
        "cancel_requested": false, "reply_to": null, "metadata": {}, "fallback_queue": null,
        "fallback_of": null, "fallback_request_id": null, "run_after": null, "deadline": null,
        "finished_at": null,
    });
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&req[k], v, "field {k} of {req}");
    }
    assert!(
        req["fairness_key"].is_string(),
        "fairness_key defaults to the tenant"
    );
    assert_eq!(ts(&req["created_at"]), ts(&req["updated_at"]));
    // The Location target is the same Request.
    assert_eq!(get_req(&s, &id).await, req);

    // Without --public-url, Operation-Location is the same relative target.
    let s = TestServer::start().await;
    let resp = s
        .post("/v1/queues/thumbs/requests", json!({"input": 1}))
        .await;
    assert_eq!(resp.status(), 202);
    assert_eq!(
        resp.headers()["operation-location"],
        resp.headers()["location"]
    );
}

#[tokio::test]
async fn every_optional_field_round_trips() {
    let s = TestServer::start().await;
    let body = json!({
        "input": [1, "two", {"three": null}], "correlation_id": "order-42", "priority": 7, "delay": 30,
        "timeout": 60.5, "max_attempts": 5, "reply_to": {"channel": "replies-1"},
        "metadata": {"k": "v", "who": "me"}, "fallback_queue": "slow-lane", "fairness_key": "tenant-a",
    });
    let req = s.submit("opts", body.clone()).await;
    for k in [
        "input",
        "correlation_id",
        "priority",
        "max_attempts",
        "reply_to",
        "metadata",
        "fallback_queue",
        "fairness_key",
    ] {
        assert_eq!(req[k], body[k], "{k}");
    }
    // delay → run_after, timeout → deadline, both from created_at.
    assert!(
        (secs_between(&req["created_at"], &req["run_after"]) - 30.0).abs() < 0.01,
        "{req}"
    );
    assert!(
        (secs_between(&req["created_at"], &req["deadline"]) - 60.5).abs() < 0.01,
        "{req}"
    );
    assert_eq!(get_req(&s, &id(&req)).await, req, "GET shows the same");
    // The history's submitted event carries the run_after.
    let h = history(&s, &id(&req)).await;
    assert_eq!(h[0]["kind"], "submitted");
    assert_eq!(h[0]["run_after"], req["run_after"]);

    // A worker sees correlation id, metadata and deadline in its claim.
    let req = s.submit("opts", json!({"input": {"x": 1}, "correlation_id": "c-9", "metadata": {"a": "b"}, "timeout": 100})).await;
    let c = claim_one(&s, "opts", 30.0).await;
    assert_eq!(c["id"], req["id"]);
    assert_eq!(c["input"], json!({"x": 1}));
    assert_eq!(c["correlation_id"], "c-9");
    assert_eq!(c["metadata"], json!({"a": "b"}));
    assert_eq!(c["deadline"], req["deadline"]);
    assert_eq!(c["attempt"], 1);

    // The input is kept byte for byte (key order, numbers beyond f64).
    let raw = r#"{"input":{"z":1,"a":123456789012345678901234567890,"m":[1.50,"é"]}}"#;
    let resp = post_raw(&s, "/v1/queues/raw/requests", Some("application/json"), raw).await;
    assert_eq!(resp.status(), 202);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains(r#""input":{"z":1,"a":123456789012345678901234567890,"m":[1.50,"é"]}"#),
        "{text}"
    );
}

#[tokio::test]
async fn prefer_wait_answers_200_when_a_worker_finishes_in_time() {
    let s = Arc::new(TestServer::start().await);
    let w = s.clone();
    let worker = tokio::spawn(async move {
        let c = claim_one(&w, "pw", 30.0).await;
        let resp = complete(&w, &id(&c), &token(&c), json!({"done": true})).await;
        assert_eq!(resp.status(), 200);
    });
    let (resp, took) = timed(
        s.http()
            .post(s.url("/v1/queues/pw/requests"))
            .header("prefer", "wait=20")
            .json(&json!({"input": 1}))
            .send(),
    )
    .await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["preference-applied"], "wait=20");
    assert!(
        resp.headers().get("retry-after").is_none(),
        "terminal: no Retry-After"
    );
    assert!(resp.headers().get("location").is_some());
    let req: Value = resp.json().await.unwrap();
    assert_eq!(req["status"], "succeeded");
    assert_eq!(req["output"], json!({"done": true}));
    assert!(
        took < Duration::from_secs(10),
        "answered when the worker finished, took {took:?}"
    );
    worker.await.unwrap();
}

/// The embedded store's flushes so far, from `/metrics` (`None` on
/// PostgreSQL, which flushes on its own and reports none).
async fn flushes(s: &TestServer) -> Option<u64> {
    let text = s.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("coatcheck_store_flushes_total "))
        .map(|n| n.trim().parse().expect("a count"))
}

/// [`flushes`] once the server's start-up work is behind it: three reads
/// 250 ms apart agree.
async fn quiet_flushes(s: &TestServer) -> Option<u64> {
    let mut last = flushes(s).await;
    let mut same = 0;
    while same < 2 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = flushes(s).await;
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// Submits `{"input": 1}` to `queue` with `Prefer: wait=<secs>`.
async fn submit_waiting(s: &TestServer, queue: &str, secs: u64) -> reqwest::Response {
    s.http()
        .post(s.url(&format!("/v1/queues/{queue}/requests")))
        .header("prefer", format!("wait={secs}"))
        .json(&json!({"input": 1}))
        .send()
        .await
        .unwrap()
}

/// A submit that waits for its reply costs one flush, its completion's,
/// which covers the submit too (a plain submit and its completion cost two);
/// one whose wait ends first is flushed before its 202. On the embedded
/// store, which counts its flushes; on PostgreSQL only the answers are
/// checked.
#[tokio::test]
async fn prefer_wait_is_flushed_with_its_completion_or_before_its_202() {
    let s = Arc::new(TestServer::start().await);
    // The claim's lease wakes the idle lease reaper, whose sweep finds
    // nothing and so costs no flush.
    let before = quiet_flushes(&s).await;
    let w = s.clone();
    let worker = tokio::spawn(async move {
        let c = claim_one(&w, "pwf", 30.0).await;
        let resp = complete(&w, &id(&c), &token(&c), json!({"done": true})).await;
        assert_eq!(resp.status(), 200);
    });
    assert_eq!(submit_waiting(&s, "pwf", 20).await.status(), 200);
    worker.await.unwrap();
    if let (Some(b), Some(a)) = (before, flushes(&s).await) {
        assert_eq!(a - b, 1, "one flush for the submit and its completion");
    }

    let before = flushes(&s).await;
    let resp = submit_waiting(&s, "pwf-none", 1).await;
    assert_eq!(resp.status(), 202);
    if let (Some(b), Some(a)) = (before, flushes(&s).await) {
        assert_eq!(a - b, 1, "flushed before the 202");
    }
    let req: Value = resp.json().await.unwrap();
    let got = json_of(s.get(&format!("/v1/requests/{}", id(&req))).await, 200).await;
    assert_eq!(got["status"], "queued");
}

#[tokio::test]
async fn prefer_wait_answers_202_when_nothing_finishes() {
    let s = TestServer::start().await;
    let (resp, took) = timed(
        s.http()
            .post(s.url("/v1/queues/pw/requests"))
            .header("prefer", "wait=1")
            .json(&json!({"input": 1}))
            .send(),
    )
    .await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 202);
    assert!(resp.headers().get("retry-after").is_some());
    assert!(
        resp.headers().get("preference-applied").is_none(),
        "only on the 200 it produced"
    );
    assert!(
        took >= Duration::from_millis(900),
        "it waited about 1 s, took {took:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let req: Value = resp.json().await.unwrap();
    assert_eq!(req["status"], "queued");
}

#[tokio::test]
async fn idempotency_key_deduplicates_even_after_a_restart() {
    let s = TestServer::start().await;
    let send = |s: &TestServer, key: &str, queue: &str, body: &str| {
        s.http()
            .post(s.url(&format!("/v1/queues/{queue}/requests")))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let body = r#"{"input": {"a": 1, "b": [1, 2]}, "priority": 3, "metadata": {"x": "y"}}"#;
    let first = send(&s, "key-1", "idem", body).await.unwrap();
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    // Same key, same body (also with keys reordered and other whitespace).
    for again in [
        body,
        r#"{"metadata":{"x":"y"},"priority":3,"input":{"b":[1,2],"a":1}}"#,
    ] {
        let resp = send(&s, "key-1", "idem", again).await.unwrap();
        assert_eq!(resp.status(), 200, "{again}");
        assert_eq!(resp.headers()["idempotent-replayed"], "true");
        assert!(resp.headers().get("location").is_some());
        let r: Value = resp.json().await.unwrap();
        assert_eq!(r["id"], first["id"]);
    }
    // Same key, different body — or the same body to another queue: 422.
    let p = assert_problem(
        send(&s, "key-1", "idem", r#"{"input": {"a": 2}}"#)
            .await
            .unwrap(),
        422,
        "idempotency-key-reused",
    )
    .await;
    assert_eq!(p.status, 422);
    assert_problem(
        send(&s, "key-1", "other", body).await.unwrap(),
        422,
        "idempotency-key-reused",
    )
    .await;
    // Another key is another request.
    let resp = send(&s, "key-2", "idem", body).await.unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(count_requests(&s).await, 2);

    let s = s.restart().await;
    let resp = send(&s, "key-1", "idem", body).await.unwrap();
    assert_eq!(resp.status(), 200, "still deduplicating after a restart");
    assert_eq!(resp.headers()["idempotent-replayed"], "true");
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["id"], first["id"]);
    assert_problem(
        send(&s, "key-1", "idem", r#"{"input": 0}"#).await.unwrap(),
        422,
        "idempotency-key-reused",
    )
    .await;
    assert_eq!(count_requests(&s).await, 2);

    // A key that is not visible ASCII or too long is a 400.
    let long = "k".repeat(300);
    assert_problem(
        send(&s, &long, "idem", body).await.unwrap(),
        400,
        "invalid-request",
    )
    .await;
}

#[tokio::test]
async fn bad_submit_bodies_are_400_problems_and_store_nothing() {
    let s = TestServer::start().await;
    let q = "/v1/queues/q/requests";
    let json_ct = Some("application/json");
    // Not JSON, or not the right shape.
    for raw in [
        r#"{"input": "#,
        "",
        "nope",
        r#"{"input": 1,}"#,
        "[]",
        "42",
        r#""input""#,
    ] {
        let resp = post_raw(&s, q, json_ct, raw).await;
        assert_problem(resp, 400, "invalid-json").await;
    }
    // Missing input, fields of the wrong type or out of the type's range.
    for body in [
        json!({}),
        json!({"priority": 1}),
        json!({"input": 1, "priority": "x"}),
        json!({"input": 1, "priority": 1.5}),
        json!({"input": 1, "priority": 1e10}),
        json!({"input": 1, "max_attempts": "3"}),
        json!({"input": 1, "max_attempts": -1}),
        json!({"input": 1, "delay": "1"}),
        json!({"input": 1, "timeout": true}),
        json!({"input": 1, "correlation_id": 5}),
        json!({"input": 1, "metadata": {"a": 1}}),
        json!({"input": 1, "metadata": "x"}),
        json!({"input": 1, "metadata": ["a"]}),
        json!({"input": 1, "reply_to": "chan"}),
        json!({"input": 1, "reply_to": {"carrier_pigeon": "x"}}),
    ] {
        let resp = s.post(q, body.clone()).await;
        let text = format!("{body}");
        let p = assert_problem(resp, 400, "invalid-json").await;
        assert!(!p.detail.is_empty(), "{text}");
    }
    // Well-typed but invalid values name the field.
    for (body, field) in [
        (json!({"input": 1, "delay": -1}), "delay"),
        (json!({"input": 1, "delay": -0.001}), "delay"),
        (json!({"input": 1, "timeout": -5}), "timeout"),
        (json!({"input": 1, "delay": 1e12}), "delay"),
        (json!({"input": 1, "max_attempts": 0}), "max_attempts"),
        (
            json!({"input": 1, "fallback_queue": "-bad"}),
            "fallback_queue",
        ),
        (
            json!({"input": 1, "reply_to": {"channel": "a b"}}),
            "reply_to.channel",
        ),
        (
            json!({"input": 1, "correlation_id": "x".repeat(300)}),
            "correlation_id",
        ),
        (
            json!({"input": 1, "correlation_id": "a\nb"}),
            "correlation_id",
        ),
    ] {
        let p = assert_problem(s.post(q, body.clone()).await, 400, "invalid-request").await;
        assert_eq!(p.extensions["field"], field, "{body}");
    }
    // Bad queue names (percent-encoded in the path).
    for name in ["a b", &"a".repeat(129), "-lead", ".dot", "ä", "a/b", "a:b"] {
        let path = format!("/v1/queues/{}/requests", enc(name));
        let p = assert_problem(
            s.post(&path, json!({"input": 1})).await,
            400,
            "invalid-request",
        )
        .await;
        assert_eq!(p.extensions["field"], "queue", "{name}");
    }
    // The longest legal name is fine.
    let longest = "a".repeat(128);
    s.submit(&longest, json!({"input": 1})).await;
    assert_eq!(count_requests(&s).await, 1, "nothing else was stored");
}

#[tokio::test]
async fn wrong_content_type_is_415_and_a_too_large_body_is_413() {
    let s = TestServer::start_with(|c| c.max_body = 256).await;
    let q = "/v1/queues/q/requests";
    let body = r#"{"input": 1}"#;
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        assert_problem(
            post_raw(&s, q, ct, body).await,
            415,
            "unsupported-media-type",
        )
        .await;
    }
    // JSON with parameters or a +json type is fine.
    assert_eq!(
        post_raw(&s, q, Some("application/json; charset=utf-8"), body)
            .await
            .status(),
        202
    );
    let big = json!({"input": "x".repeat(1000)});
    assert_problem(s.post(q, big).await, 413, "payload-too-large").await;
    // Also without a Content-Length (chunked).
    let chunks: Vec<Result<String, std::io::Error>> = (0..20).map(|_| Ok("x".repeat(50))).collect();
    let stream = futures::stream::iter(chunks);
    let resp = s
        .http()
        .post(s.url(q))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_problem(resp, 413, "payload-too-large").await;
    // The limit applies to the worker routes too.
    let big = json!({"worker_id": "x".repeat(1000)});
    assert_problem(
        s.post("/v1/queues/q/claims", big).await,
        413,
        "payload-too-large",
    )
    .await;
    assert_eq!(count_requests(&s).await, 1);
}

#[tokio::test]
async fn prefer_wait_above_the_cap_is_clamped() {
    let s = TestServer::start_with(|c| c.max_wait = Duration::from_secs(1)).await;
    let (resp, took) = timed(
        s.http()
            .post(s.url("/v1/queues/pw/requests"))
            .header("prefer", "respond-async, wait=100")
            .json(&json!({"input": 1}))
            .send(),
    )
    .await;
    assert_eq!(resp.unwrap().status(), 202);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submits_with_one_idempotency_key_create_one_request() {
    let s = Arc::new(TestServer::start().await);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let s = s.clone();
        set.spawn(async move {
            let resp = s
                .http()
                .post(s.url("/v1/queues/race/requests"))
                .header("idempotency-key", "same")
                .json(&json!({"input": {"n": 1}}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, id(&resp.json::<Value>().await.unwrap()))
        });
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    while let Some(r) = set.join_next().await {
        let (status, id) = r.unwrap();
        assert!(status == 202 || status == 200, "{status}");
        created += usize::from(status == 202);
        ids.insert(id);
    }
    assert_eq!(created, 1, "exactly one 202");
    assert_eq!(ids.len(), 1, "every answer names the same request");
    assert_eq!(count_requests(&s).await, 1);
}
