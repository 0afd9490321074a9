//! Operations (`/v1/queues`, `/healthz`, `/readyz`, `/metrics`,
//! `/openapi.json`, `/`), malformed ids and wrong methods on every route,
//! and graceful shutdown answering long-polls at once.

use std::time::Duration;

use coatcheck_testkit::{assert_problem, TestServer};
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn queues_count_requests_by_status() {
    let s = TestServer::start().await;
    assert_eq!(
        json_of(s.get("/v1/queues").await, 200).await,
        json!({"queues": []})
    );
    for i in 0..4 {
        s.submit("qa", json!({"input": i})).await;
    }
    s.submit("qb", json!({"input": 0})).await;
    let c = claim_wait(&s, "qa", 2, 30.0, 0.0).await;
    assert_eq!(
        complete(&s, &id(&c[0]), &token(&c[0]), json!(1))
            .await
            .status(),
        200
    );
    let v = json_of(s.get("/v1/queues").await, 200).await;
    let qs = v["queues"].as_array().unwrap();
    let names: Vec<&str> = qs.iter().map(|q| q["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["qa", "qb"]);
    assert_eq!(
        qs[0]["counts"],
        json!({"queued": 2, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 0, "expired": 0})
    );
    assert_eq!(qs[1]["counts"]["queued"], 1);
    assert!(qs[0]["oldest_queued_age"].as_f64().unwrap() >= 0.0);
    assert!(
        qs[0]["claim_rate"].as_f64().unwrap() > 0.0,
        "two claims in the last minute"
    );
    assert_eq!(qs[1]["claim_rate"].as_f64().unwrap(), 0.0);
}

#[tokio::test]
async fn health_and_readiness() {
    let s = TestServer::start().await;
    assert_eq!(json_of(s.get("/healthz").await, 200).await["status"], "ok");
    assert_eq!(
        json_of(s.get("/readyz").await, 200).await["status"],
        "ready"
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let s = TestServer::start().await;
    for i in 0..3 {
        s.submit("mq", json!({"input": i})).await;
    }
    let c = claim_wait(&s, "mq", 2, 30.0, 0.0).await;
    assert_eq!(
        complete(&s, &id(&c[0]), &token(&c[0]), json!(1))
            .await
            .status(),
        200
    );
    let resp = s.get("/metrics").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    for line in [
        r#"coatcheck_requests{queue="mq",status="queued"} 1"#,
        r#"coatcheck_requests{queue="mq",status="running"} 1"#,
        r#"coatcheck_requests{queue="mq",status="succeeded"} 1"#,
        r#"coatcheck_requests{queue="mq",status="failed"} 0"#,
        r#"coatcheck_submitted_total{queue="mq"} 3"#,
        r#"coatcheck_claimed_total{queue="mq"} 2"#,
        r#"coatcheck_completed_total{queue="mq"} 1"#,
        "# TYPE coatcheck_request_duration_seconds histogram",
        "# TYPE coatcheck_http_request_duration_seconds histogram",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(
        text.contains(r#"coatcheck_request_duration_seconds_bucket{queue="mq",le="+Inf"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"coatcheck_request_duration_seconds_count{queue="mq"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("coatcheck_http_request_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(
        text.contains(r#"route="/v1/queues/{queue}/requests",status="202""#),
        "{text}"
    );
    // Every sample line is `name{labels} number`.
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {l}");
        let metric = name.split('{').next().unwrap();
        assert!(
            metric
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {l}"
        );
        if name.contains('{') {
            assert!(name.ends_with('}'), "bad labels in {l}");
        }
    }
}

#[tokio::test]
async fn openapi_describes_every_route() {
    let s = TestServer::start().await;
    let resp = s.get("/openapi.json").await;
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc = json_of(resp, 200).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    for (path, methods) in [
        ("/v1/queues/{queue}/requests", &["post"][..]),
        ("/v1/requests", &["get"]),
        ("/v1/requests/{id}", &["get", "delete"]),
        ("/v1/requests/{id}/result", &["get"]),
        ("/v1/requests/{id}/history", &["get"]),
        ("/v1/requests/{id}/redrive", &["post"]),
        ("/v1/queues/{queue}/claims", &["post"]),
        ("/v1/requests/{id}/heartbeat", &["post"]),
        ("/v1/requests/{id}/complete", &["post"]),
        ("/v1/requests/{id}/fail", &["post"]),
        ("/v1/queues/{queue}/settlements", &["post"]),
        ("/v1/queues", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
        ("/openapi.json", &["get"]),
        ("/", &["get"]),
    ] {
        let p = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from the OpenAPI document"));
        for m in methods {
            assert!(p.get(*m).is_some(), "{m} {path} missing");
        }
    }
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in [
        "Request",
        "SubmitBody",
        "ClaimBody",
        "Problem",
        "HistoryEvent",
    ] {
        assert!(schemas.contains_key(name), "schema {name}");
    }
}

#[tokio::test]
async fn the_root_is_an_html_status_page() {
    let s = TestServer::start().await;
    s.submit("page-q", json!({"input": 1})).await;
    let resp = s.get("/").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = resp.text().await.unwrap();
    assert!(
        html.to_ascii_lowercase().starts_with("<!doctype html>"),
        "{html}"
    );
    assert!(html.contains("page-q"));
}

#[tokio::test]
async fn malformed_ids_are_404_problems_on_every_route() {
    let s = TestServer::start().await;
    let unknown = "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77";
    let worker = json!({"lease_token": "abc", "output": 1, "error": {"message": "m"}});
    for id in [
        unknown,
        "x",
        "%20",
        "%E2%9C%93",
        "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e7",
        &"a".repeat(4000),
    ] {
        let gets = ["", "/result", "/history"];
        for suffix in gets {
            assert_problem(
                s.get(&format!("/v1/requests/{id}{suffix}")).await,
                404,
                "not-found",
            )
            .await;
        }
        let del = s
            .http()
            .delete(s.url(&format!("/v1/requests/{id}")))
            .send()
            .await
            .unwrap();
        assert_problem(del, 404, "not-found").await;
        for suffix in ["/redrive", "/heartbeat", "/complete", "/fail"] {
            let resp = s
                .post(&format!("/v1/requests/{id}{suffix}"), worker.clone())
                .await;
            assert_problem(resp, 404, "not-found").await;
        }
    }
}

#[tokio::test]
async fn wrong_methods_are_405_problems_with_allow() {
    let s = TestServer::start().await;
    for (method, path, allow) in [
        (reqwest::Method::GET, "/v1/queues/q/requests", "POST"),
        (reqwest::Method::GET, "/v1/queues/q/claims", "POST"),
        (
            reqwest::Method::PUT,
            "/v1/requests/0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77",
            "GET",
        ),
        (reqwest::Method::POST, "/healthz", "GET"),
        (reqwest::Method::DELETE, "/v1/queues", "GET"),
    ] {
        let resp = s
            .http()
            .request(method.clone(), s.url(path))
            .send()
            .await
            .unwrap();
        let a = resp
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        assert!(a.contains(allow), "{method} {path}: Allow {a:?}");
        assert_problem(resp, 405, "method-not-allowed").await;
    }
    for path in [
        "/v2/requests",
        "/v1/queues/q",
        "/v1/requests/x/y/z",
        "/v1/queues/q/requests/extra",
    ] {
        assert_problem(s.get(path).await, 404, "route-not-found").await;
    }
}

#[tokio::test]
async fn shutdown_answers_long_polls_at_once() {
    let s = TestServer::start().await;
    let id = id(&s.submit("sd", json!({"input": 1})).await);
    let http = s.http().clone();
    let status_url = s.url(&format!("/v1/requests/{id}?wait=30"));
    let claim_url = s.url("/v1/queues/empty/claims");
    let poll = tokio::spawn({
        let http = http.clone();
        async move { timed(http.get(status_url).send()).await }
    });
    let claim = tokio::spawn(async move {
        timed(
            http.post(claim_url)
                .json(&json!({"worker_id": "w", "wait": 30}))
                .send(),
        )
        .await
    });
    // Both long-polls are in flight once they subscribed to the notifier.
    let notifier = s.server().engine().notifier.clone();
    until("two long-polls waiting", || notifier.len() >= 2).await;
    let stop = tokio::spawn(s.stop());

    let (resp, took) = poll.await.unwrap();
    let resp = resp.expect("an answer, not a dropped connection");
    assert!(
        took < Duration::from_secs(3),
        "answered at once on shutdown: {took:?}"
    );
    let r = json_of(resp, 200).await;
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["status"], "queued", "its current state");

    let (resp, took) = claim.await.unwrap();
    assert!(took < Duration::from_secs(3), "{took:?}");
    let v = json_of(resp.expect("claim answer"), 200).await;
    assert_eq!(v["requests"], json!([]));
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("the server stops")
        .unwrap();
}

#[tokio::test]
async fn hostile_input_is_a_4xx_problem_never_a_500() {
    let s = TestServer::start_with(|c| c.max_wait = Duration::from_secs(1)).await;
    let id = id(&s.submit("h", json!({"input": 1})).await);
    let deep = "[".repeat(10_000);
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    let hb = format!("/v1/requests/{id}/heartbeat");
    let wait_inf = format!("/v1/requests/{id}?wait=1e999");
    let cases: Vec<(reqwest::Method, &str, Option<&str>, u16, &str)> = vec![
        (
            post.clone(),
            "/v1/queues/h/requests",
            Some(r#"{"input": 1, "input": 2}"#),
            400,
            "invalid-json",
        ),
        (
            post.clone(),
            "/v1/queues/h/requests",
            Some(&deep),
            400,
            "invalid-json",
        ),
        (
            post.clone(),
            "/v1/queues/h/requests",
            Some("{\"input\": 1}\u{0}"),
            400,
            "invalid-json",
        ),
        (
            post.clone(),
            "/v1/queues/h/requests",
            Some("\u{feff}{\"input\": 1}"),
            400,
            "invalid-json",
        ),
        (
            post.clone(),
            "/v1/queues/h/claims",
            Some(r#"{"worker_id": "w", "lease": 1e400}"#),
            400,
            "invalid-json",
        ),
        (
            post.clone(),
            "/v1/queues/h/claims",
            Some(r#"{"worker_id": "w", "lease": 1e300}"#),
            400,
            "invalid-request",
        ),
        (
            post.clone(),
            &hb,
            Some(r#"{"lease_token": "t", "extend": 1e300}"#),
            400,
            "invalid-request",
        ),
        (get.clone(), &wait_inf, None, 400, "invalid-request"),
        (
            get.clone(),
            "/v1/requests?limit=99999999999999999999",
            None,
            400,
            "invalid-request",
        ),
        (
            get.clone(),
            "/v1/requests?page_token=%FF%FE",
            None,
            400,
            "invalid-request",
        ),
        (
            get.clone(),
            "/v1/requests?limit=%00",
            None,
            400,
            "invalid-request",
        ),
    ];
    for (method, path, body, status, slug) in cases {
        let mut b = s.http().request(method.clone(), s.url(path));
        if let Some(body) = body {
            b = b
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        assert_problem(b.send().await.unwrap(), status, slug).await;
    }
    // A wait far above the cap is clamped, not refused.
    let (got, took) = timed(claim_wait(&s, "h2", 1, 30.0, 1e300)).await;
    assert!(got.is_empty() && took < Duration::from_secs(10), "{took:?}");
    // And the request is unharmed.
    assert_eq!(get_req(&s, &id).await["status"], "queued");
}
