//! Small helpers shared by the HTTP contract tests: worker calls, history
//! kinds, percent-encoding, and wait loops that end on a condition (with a
//! timeout) instead of sleeping a fixed time.

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use coatcheck_testkit::TestServer;
use serde_json::{json, Value};

/// The `id` of a Request (or claimed request) JSON.
pub fn id(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_string()
}

/// The `lease_token` of a claimed request.
pub fn token(v: &Value) -> String {
    v["lease_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no lease_token in {v}"))
        .to_string()
}

/// Parses an RFC 3339 field of a JSON value.
pub fn ts(v: &Value) -> DateTime<Utc> {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .with_timezone(&Utc)
}

/// Seconds from `a` to `b` (fields of JSON values).
pub fn secs_between(a: &Value, b: &Value) -> f64 {
    (ts(b) - ts(a)).num_microseconds().expect("small") as f64 / 1e6
}

/// Percent-encodes a path segment.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The JSON body of a response, asserting its status first.
pub async fn json_of(resp: reqwest::Response, status: u16) -> Value {
    let url = resp.url().to_string();
    let got = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    assert_eq!(got, status, "status of {url}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `GET /v1/requests/{id}` (asserting 200).
pub async fn get_req(s: &TestServer, id: &str) -> Value {
    json_of(s.get(&format!("/v1/requests/{id}")).await, 200).await
}

/// POSTs a claim body to a queue and returns the response.
pub async fn claim_raw(s: &TestServer, queue: &str, body: Value) -> reqwest::Response {
    s.post(&format!("/v1/queues/{queue}/claims"), body).await
}

/// Claims with a long-poll of `wait` seconds and a lease of `lease`
/// seconds; returns the claimed items.
pub async fn claim_wait(
    s: &TestServer,
    queue: &str,
    max: u32,
    lease: f64,
    wait: f64,
) -> Vec<Value> {
    let body = json!({"worker_id": "w-test", "max": max, "lease": lease, "wait": wait});
    let v = json_of(claim_raw(s, queue, body).await, 200).await;
    v["requests"].as_array().cloned().expect("requests array")
}

/// Claims exactly one request (waiting up to 10 s for it) under `lease`.
pub async fn claim_one(s: &TestServer, queue: &str, lease: f64) -> Value {
    let got = claim_wait(s, queue, 1, lease, 10.0).await;
    assert_eq!(got.len(), 1, "expected one claimed request in {queue}");
    got.into_iter().next().expect("one")
}

/// `POST /v1/requests/{id}/complete`.
pub async fn complete(s: &TestServer, id: &str, token: &str, output: Value) -> reqwest::Response {
    s.post(
        &format!("/v1/requests/{id}/complete"),
        json!({"lease_token": token, "output": output}),
    )
    .await
}

/// `POST /v1/requests/{id}/fail` with `extra` merged into the body.
pub async fn fail(s: &TestServer, id: &str, token: &str, extra: Value) -> reqwest::Response {
    let mut body = json!({"lease_token": token, "error": {"code": "boom", "message": "it broke"}});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    s.post(&format!("/v1/requests/{id}/fail"), body).await
}

/// `POST /v1/requests/{id}/heartbeat`.
pub async fn heartbeat(s: &TestServer, id: &str, body: Value) -> reqwest::Response {
    s.post(&format!("/v1/requests/{id}/heartbeat"), body).await
}

/// The history of a request.
pub async fn history(s: &TestServer, id: &str) -> Vec<Value> {
    let h = json_of(s.get(&format!("/v1/requests/{id}/history")).await, 200).await;
    h["events"].as_array().cloned().expect("events array")
}

/// The kinds of a request's history, oldest first.
pub async fn kinds(s: &TestServer, id: &str) -> Vec<String> {
    history(s, id)
        .await
        .iter()
        .map(|e| e["kind"].as_str().expect("kind").to_string())
        .collect()
}

/// Polls `GET /v1/requests/{id}` until `status`, failing after `timeout`.
/// For changes a status long-poll does not return on (it returns on
/// terminal states only), e.g. a lease expiry putting a request back to
/// `queued`.
pub async fn wait_for_status(s: &TestServer, id: &str, status: &str, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let r = get_req(s, id).await;
        if r["status"] == status {
            return r;
        }
        assert!(
            start.elapsed() < timeout,
            "{id} did not become {status} within {timeout:?}; it is {}",
            r["status"]
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Long-polls `GET /v1/requests/{id}?wait=10` until it answers a terminal
/// state (asserting it does).
pub async fn wait_terminal(s: &TestServer, id: &str) -> Value {
    let r = json_of(s.get(&format!("/v1/requests/{id}?wait=10")).await, 200).await;
    let st = r["status"].as_str().expect("status");
    assert!(
        !["queued", "running"].contains(&st),
        "{id} is still {st} after a 10 s long-poll"
    );
    r
}

/// Runs `f` and returns its output and how long it took.
pub async fn timed<T>(f: impl Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

/// Waits until `cond` holds, checking every 5 ms, failing after 10 s.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
