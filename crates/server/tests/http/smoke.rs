use coatcheck_testkit::{assert_problem, TestServer};
use serde_json::json;

#[tokio::test]
async fn a_request_goes_in_and_its_reply_comes_out() {
    let s = TestServer::start().await;
    let resp = s
        .post(
            "/v1/queues/echo/requests",
            json!({"input": {"n": 1}, "correlation_id": "c-1"}),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(resp.headers()["retry-after"], "1");
    let req: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(loc, format!("/v1/requests/{}", req["id"].as_str().unwrap()));
    let claimed = s.claim("echo", 10).await;
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    assert_eq!(c["input"], json!({"n": 1}));
    let done = s
        .post(
            &format!("/v1/requests/{}/complete", c["id"].as_str().unwrap()),
            json!({"lease_token": c["lease_token"], "output": {"ok": true}}),
        )
        .await;
    assert_eq!(done.status(), 200);
    let r: serde_json::Value = s.get(&format!("{loc}/result")).await.json().await.unwrap();
    assert_eq!(r, json!({"ok": true}));
    let h: serde_json::Value = s.get(&format!("{loc}/history")).await.json().await.unwrap();
    let kinds: Vec<_> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["submitted", "claimed", "succeeded"]);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let s = TestServer::start().await;
    assert_problem(s.get("/nope").await, 404, "route-not-found").await;
    let resp = s.http().put(s.url("/v1/requests")).send().await.unwrap();
    assert!(resp.headers().get("allow").is_some(), "Allow header");
    assert_problem(resp, 405, "method-not-allowed").await;
    let resp = s
        .http()
        .post(s.url("/v1/queues/q/requests"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(resp, 415, "unsupported-media-type").await;
    let resp = s
        .http()
        .post(s.url("/v1/queues/q/requests"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_problem(resp, 400, "invalid-json").await;
    assert_problem(s.get("/v1/requests/not-an-id").await, 404, "not-found").await;
}
