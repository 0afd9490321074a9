//! Property tests of every parser of untrusted input, over real HTTP: JSON
//! bodies of every POST route (arbitrary JSON and arbitrary bytes), query
//! strings, the `Prefer`, `Idempotency-Key` and `Last-Event-ID` headers,
//! and page tokens. The property is the contract's: never a 5xx, and every
//! 4xx a problem document (`application/problem+json` whose `status` is the
//! HTTP status). Page tokens must also be tamper-evident: a bit flipped, or
//! a token of another tenant, is a 400 — never someone else's page.
//!
//! Each test starts one server and runs its cases against it (a proptest
//! `TestRunner` driving a Tokio runtime), with long-polls capped at 200 ms
//! so that a valid `wait` costs little. The unit tests beside each parser
//! (`api::{extract, requests, events, page_token}`) fuzz them without HTTP;
//! `scripts/schemathesis.sh` fuzzes the whole API from its OpenAPI document.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use coatcheck_testkit::{Backend, TestServer};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use serde_json::{json, Value};

use crate::helpers::id;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A runner of `cases` cases; `COATCHECK_FUZZ_CASES=N` runs N instead (a
/// longer hunt than CI's).
fn runner(cases: u32) -> TestRunner {
    let cases = std::env::var("COATCHECK_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

/// A server whose long-polls end after 200 ms.
async fn fast_server(backend: Backend) -> TestServer {
    TestServer::start_on_with(backend, |cfg| {
        cfg.max_wait = Duration::from_millis(200);
        cfg.sse_keep_alive = Duration::from_millis(200);
    })
    .await
}

/// Checks an answer against the contract; answers its status. The body of
/// an event stream is not read (it does not end).
async fn check(resp: reqwest::Response) -> Result<u16, TestCaseError> {
    let status = resp.status().as_u16();
    let url = resp.url().to_string();
    let ct = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if ct.starts_with("text/event-stream") {
        prop_assert_eq!(status, 200, "{}", url);
        return Ok(status);
    }
    let body = resp
        .text()
        .await
        .map_err(|e| TestCaseError::fail(format!("{url}: body: {e}")))?;
    prop_assert!(status < 500, "{} answered {}: {}", url, status, body);
    if status >= 400 {
        prop_assert!(
            ct.starts_with("application/problem+json"),
            "{} {} is not a problem document ({}): {}",
            url,
            status,
            ct,
            body
        );
        let p: Value = serde_json::from_str(&body)
            .map_err(|e| TestCaseError::fail(format!("{url} {status}: not JSON ({e}): {body}")))?;
        for field in ["type", "title", "detail"] {
            prop_assert!(
                p[field].is_string(),
                "{} {}: no {}: {}",
                url,
                status,
                field,
                body
            );
        }
        prop_assert_eq!(
            p["status"].as_u64(),
            Some(status as u64),
            "{}: {}",
            url,
            body
        );
    }
    Ok(status)
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

// ---------------------------------------------------------------- strategies

/// A field name the bodies know (so values reach the field parsers), or anything.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(vec![
            "input", "correlation_id", "priority", "delay", "timeout", "max_attempts",
            "reply_to", "metadata", "fallback_queue", "fairness_key", "channel", "webhook",
            "url", "worker_id", "max", "lease", "wait", "lease_token", "progress", "extend",
            "output", "error", "message", "code", "details", "retryable", "retry_after",
            "items", "id", "ack_tokens",
        ])
        .prop_map(String::from),
        1 => "\\PC{0,12}",
    ]
}

/// Any JSON value, rich in the numbers and strings that break parsers.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        proptest::sample::select(vec![
            json!(0),
            json!(1),
            json!(-1),
            json!(1.5),
            json!(-0.0),
            json!(1e308),
            json!(5e-324),
            json!(4294967296u64),
            json!(315360001),
            json!(i64::MIN),
            json!(u64::MAX),
        ]),
        "\\PC{0,24}".prop_map(Value::from),
        proptest::sample::select(vec![
            "",
            "a",
            "q1",
            "x\u{0}y",
            "line\nbreak",
            "https://example.com/h",
            "http://127.0.0.1/",
            "ftp://x",
            "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map(field_name(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON object of known and unknown fields with arbitrary values: the
/// shape every body has, so the fields' own checks are reached.
fn json_object() -> impl Strategy<Value = Value> {
    proptest::collection::btree_map(field_name(), json_value(), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// A request body: JSON (mostly objects), or arbitrary bytes.
#[derive(Debug, Clone)]
enum Body {
    Json(Value),
    Bytes(Vec<u8>),
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        6 => json_object().prop_map(Body::Json),
        2 => json_value().prop_map(Body::Json),
        2 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Body::Bytes),
    ]
}

fn content_type() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        8 => Just(Some("application/json")),
        1 => Just(Some("application/json; charset=utf-8")),
        1 => Just(Some("application/merge-patch+json")),
        1 => Just(Some("text/plain")),
        1 => Just(None),
    ]
}

/// A query string of known and unknown keys with random values.
fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        4 => proptest::sample::select(vec![
            "wait", "limit", "max", "visibility", "auto_ack", "queue", "status",
            "correlation_id", "page_token",
        ])
        .prop_map(String::from),
        1 => "[a-z_]{0,8}",
    ];
    let value = prop_oneof![
        "[0-9.eE+-]{0,12}",
        "-?(inf|NaN|infinity|1e400|1e-400|0x10|4294967296|18446744073709551616|0|1|100|101|1000|1001)",
        "(true|false|1|0|yes|queued|running|succeeded|failed|cancelled|expired|Queued)",
        // Control characters (NUL: PostgreSQL refuses it), encoded or not valid UTF-8.
        "(%00|a%00b|%0A|%7F|%C2%85|%FF|%C3|%E2%80%AE)",
        proptest::collection::vec(any::<u8>(), 0..24)
            .prop_map(|b| b.iter().map(|b| format!("%{b:02X}")).collect::<String>()),
        "[!-~]{0,16}",
    ];
    proptest::collection::vec((key, value), 0..5).prop_map(|kv| {
        kv.into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    })
}

/// Header bytes: mostly printable, sometimes anything a header may carry.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[ -~]{0,40}".prop_map(String::into_bytes),
        "(wait|WAIT|respond-async|return)(=| = |=\")?[0-9a-z.\"-]{0,12}(, wait=[0-9]{1,25})?"
            .prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

// ---------------------------------------------------------------- bodies

/// Submits one request and claims it with a long lease: a live target for
/// heartbeat, complete and fail. Answers (id, lease token).
async fn running_request(s: &TestServer, queue: &str) -> (String, String) {
    s.submit(queue, json!({"input": {"n": 1}})).await;
    let resp = s
        .post(
            &format!("/v1/queues/{queue}/claims"),
            json!({"worker_id": "fuzz", "lease": 3600}),
        )
        .await;
    let v: Value = resp.json().await.expect("claim answer");
    let c = &v["requests"][0];
    (id(c), c["lease_token"].as_str().expect("token").to_string())
}

fn fuzz_bodies(backend: Backend) {
    let rt = runtime();
    let s = rt.block_on(fast_server(backend));
    let (live, token) = rt.block_on(running_request(&s, "fz-work"));
    let unknown = "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77";
    let routes: Vec<String> = vec![
        "/v1/queues/fz/requests".into(),
        "/v1/queues/fz/claims".into(),
        "/v1/queues/fz-work/settlements".into(),
        format!("/v1/requests/{live}/heartbeat"),
        format!("/v1/requests/{live}/complete"),
        format!("/v1/requests/{live}/fail"),
        format!("/v1/requests/{unknown}/complete"),
        format!("/v1/requests/{live}/redrive"),
        "/v1/channels/fz/ack".into(),
    ];
    let strategy = (
        proptest::sample::select(routes),
        body(),
        content_type(),
        any::<bool>(),
    );
    let res = runner(256).run(&strategy, |(route, body, ct, use_token)| {
        rt.block_on(async {
            let bytes = match body {
                Body::Json(mut v) => {
                    // Half the time, the real lease token: past the fencing
                    // check, into the settlement's own parsing.
                    if use_token && v.get("lease_token").is_some() {
                        v["lease_token"] = json!(token);
                    }
                    serde_json::to_vec(&v).expect("JSON")
                }
                Body::Bytes(b) => b,
            };
            let mut req = s.http().post(s.url(&route)).body(bytes);
            if let Some(ct) = ct {
                req = req.header(CONTENT_TYPE, ct);
            }
            let resp = req.send().await.map_err(fail)?;
            check(resp).await?;
            Ok(())
        })
    });
    rt.block_on(s.stop());
    res.unwrap();
}

#[test]
fn every_post_body_is_parsed_or_refused_with_a_problem() {
    fuzz_bodies(Backend::Embedded);
}

/// The same on PostgreSQL (text there cannot hold NUL; `x\u0000y` strings
/// are among the values).
#[test]
fn every_post_body_is_parsed_or_refused_on_postgres_too() {
    fuzz_bodies(Backend::Postgres);
}

// ---------------------------------------------------------------- queries

fn fuzz_queries(backend: Backend) {
    let rt = runtime();
    let s = rt.block_on(fast_server(backend));
    let queued = rt.block_on(async { id(&s.submit("fz", json!({"input": 1})).await) });
    let routes: Vec<String> = vec![
        "/v1/requests".into(),
        format!("/v1/requests/{queued}"),
        format!("/v1/requests/{queued}/events"),
        "/v1/channels/fz/messages".into(),
        "/v1/channels/fz/events".into(),
        "/v1/queues".into(),
    ];
    let strategy = (proptest::sample::select(routes), query());
    let res = runner(192).run(&strategy, |(route, q)| {
        rt.block_on(async {
            let mut url = reqwest::Url::parse(&s.url(&route)).map_err(fail)?;
            url.set_query(Some(&q));
            // An SSE answer is checked by its head; dropping it closes the stream.
            let resp = tokio::time::timeout(Duration::from_secs(10), s.http().get(url).send())
                .await
                .map_err(|_| fail(format!("{route}?{q}: no answer within 10 s")))?
                .map_err(fail)?;
            check(resp).await?;
            Ok(())
        })
    });
    rt.block_on(s.stop());
    res.unwrap();
}

#[test]
fn every_query_string_is_parsed_or_refused_with_a_problem() {
    fuzz_queries(Backend::Embedded);
}

/// The same on PostgreSQL, which refuses bytes SQLite stores (NUL): such
/// input must be refused before the store, not become a 500.
#[test]
fn every_query_string_is_parsed_or_refused_on_postgres_too() {
    fuzz_queries(Backend::Postgres);
}

// ---------------------------------------------------------------- headers

#[test]
fn prefer_idempotency_key_and_last_event_id_are_parsed_or_refused() {
    let rt = runtime();
    let s = rt.block_on(fast_server(Backend::Embedded));
    let (done, queued) = rt.block_on(async {
        let done = id(&s.submit("fz-h", json!({"input": 1})).await);
        let cancelled = s
            .http()
            .delete(s.url(&format!("/v1/requests/{done}")))
            .send()
            .await
            .expect("cancel");
        assert_eq!(cancelled.status(), 200);
        (done, id(&s.submit("fz-h", json!({"input": 2})).await))
    });
    let strategy = (0..4usize, header_bytes(), header_bytes());
    let res = runner(256).run(&strategy, |(target, a, b)| {
        rt.block_on(async {
            let mut headers = HeaderMap::new();
            let mut put = |name: &'static str, v: &[u8]| {
                if let Ok(v) = HeaderValue::from_bytes(v) {
                    headers.append(HeaderName::from_static(name), v);
                }
            };
            let req = match target {
                0 | 1 => {
                    put("prefer", &a);
                    put("idempotency-key", &b);
                    s.http()
                        .post(s.url("/v1/queues/fz-h/requests"))
                        .json(&json!({"input": {"n": target}}))
                }
                // A terminal request's stream ends; a live one's head is enough.
                2 => {
                    put("last-event-id", &a);
                    s.http().get(s.url(&format!("/v1/requests/{done}/events")))
                }
                _ => {
                    put("last-event-id", &a);
                    s.http()
                        .get(s.url(&format!("/v1/requests/{queued}/events")))
                }
            };
            let resp = tokio::time::timeout(Duration::from_secs(10), req.headers(headers).send())
                .await
                .map_err(|_| fail("no answer within 10 s"))?
                .map_err(fail)?;
            check(resp).await?;
            Ok(())
        })
    });
    rt.block_on(s.stop());
    res.unwrap();
}

// ---------------------------------------------------------------- page tokens

const KEY_A: &str = "ck_fuzz_client_tenant_a_000001";
const KEY_B: &str = "ck_fuzz_client_tenant_b_000001";
const KEY_ADMIN: &str = "ck_fuzz_admin_00000000000000001";

/// A server with two client keys of tenants `a` and `b` and an admin.
async fn keyed_server(dir: &tempfile::TempDir) -> TestServer {
    let path: PathBuf = dir.path().join("keys.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[key]]
name = "a"
secret = "{KEY_A}"
role = "client"
tenant = "a"

[[key]]
name = "b"
secret = "{KEY_B}"
role = "client"
tenant = "b"

[[key]]
name = "admin"
secret = "{KEY_ADMIN}"
role = "admin"
tenant = "ops"
"#
        ),
    )
    .expect("keys file");
    TestServer::start_with(move |cfg| cfg.keys_file = Some(path.clone())).await
}

/// `GET /v1/requests?{query}` as `key`: (status, body).
async fn list_as(s: &TestServer, key: &str, query: &str) -> (u16, Value) {
    let resp = s
        .http()
        .get(s.url(&format!("/v1/requests?{query}")))
        .bearer_auth(key)
        .send()
        .await
        .expect("list");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON"))
}

async fn submit_as(s: &TestServer, key: &str, n: u32) {
    let resp = s
        .http()
        .post(s.url("/v1/queues/fz-pages/requests"))
        .bearer_auth(key)
        .json(&json!({"input": n}))
        .send()
        .await
        .expect("submit");
    assert_eq!(resp.status(), 202);
}

fn assert_page_token_refused(status: u16, body: &Value, what: &str) {
    assert_eq!(status, 400, "{what}: {body}");
    assert_eq!(body["field"], "page_token", "{what}: {body}");
}

#[test]
fn page_tokens_are_tamper_evident_and_bound_to_their_tenant() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let s = rt.block_on(keyed_server(&dir));
    let token = rt.block_on(async {
        for n in 0..3 {
            submit_as(&s, KEY_A, n).await;
            submit_as(&s, KEY_B, n).await;
        }
        let (status, page) = list_as(&s, KEY_A, "limit=1").await;
        assert_eq!(status, 200, "{page}");
        let token = page["next_page_token"]
            .as_str()
            .expect("a next page")
            .to_string();
        // Its owner pages on with it…
        let (status, next) = list_as(&s, KEY_A, &format!("limit=10&page_token={token}")).await;
        assert_eq!(status, 200, "{next}");
        assert_eq!(next["requests"].as_array().map(Vec::len), Some(2));
        // …another tenant, or an admin, cannot: it is not theirs.
        for key in [KEY_B, KEY_ADMIN] {
            let (status, body) = list_as(&s, key, &format!("page_token={token}")).await;
            assert_page_token_refused(status, &body, "another caller's token");
        }
        token
    });
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&token)
        .expect("base64url");
    let bits = raw.len() * 8;
    let strategy = (0..bits, "[A-Za-z0-9_-]{0,3}");
    let res = runner(128).run(&strategy, |(bit, junk)| {
        rt.block_on(async {
            let mut flipped = raw.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(flipped);
            let (status, body) = list_as(&s, KEY_A, &format!("page_token={forged}")).await;
            prop_assert_eq!(status, 400, "bit {} flipped: {}", bit, body);
            prop_assert_eq!(&body["field"], "page_token");
            let (status, body) = list_as(&s, KEY_A, &format!("page_token={token}{junk}")).await;
            if junk.is_empty() {
                prop_assert_eq!(status, 200);
            } else {
                prop_assert_eq!(status, 400, "{}: {}", junk, body);
            }
            Ok(())
        })
    });
    rt.block_on(s.stop());
    res.unwrap();
}

#[test]
fn random_page_tokens_are_400_problems() {
    let rt = runtime();
    let s = rt.block_on(TestServer::start());
    rt.block_on(s.submit("fz-pages", json!({"input": 1})));
    let res = runner(128).run(&"\\PC{1,80}", |t| {
        rt.block_on(async {
            let mut url = reqwest::Url::parse(&s.url("/v1/requests")).map_err(fail)?;
            url.query_pairs_mut().append_pair("page_token", &t);
            let status = check(s.http().get(url).send().await.map_err(fail)?).await?;
            prop_assert_eq!(status, 400, "{:?}", t);
            Ok(())
        })
    });
    rt.block_on(s.stop());
    res.unwrap();
}

/// The key is a store secret: a token issued before a restart still pages
/// after it.
#[tokio::test]
async fn a_page_token_survives_a_restart() {
    let s = TestServer::start().await;
    for n in 0..3 {
        s.submit("fz-pages", json!({"input": n})).await;
    }
    let page: Value = s
        .get("/v1/requests?limit=1")
        .await
        .json()
        .await
        .expect("JSON");
    let token = page["next_page_token"].as_str().expect("next").to_string();
    let s = s.restart().await;
    let resp = s
        .get(&format!("/v1/requests?limit=10&page_token={token}"))
        .await;
    assert_eq!(resp.status(), 200);
    let next: Value = resp.json().await.expect("JSON");
    assert_eq!(next["requests"].as_array().map(Vec::len), Some(2), "{next}");
    s.stop().await;
}

/// Nodes sharing a PostgreSQL store share the key: a token one node issued
/// pages on another.
#[tokio::test]
async fn a_page_token_of_one_node_pages_on_another() {
    let a = TestServer::start_postgres().await;
    for n in 0..3 {
        a.submit("fz-pages", json!({"input": n})).await;
    }
    let page: Value = a
        .get("/v1/requests?limit=1")
        .await
        .json()
        .await
        .expect("JSON");
    let token = page["next_page_token"].as_str().expect("next").to_string();

    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = coatcheck_server::Config::embedded(dir.path().join("unused"));
    cfg.store = coatcheck_server::StoreConfig::Postgres {
        url: a.schema().expect("postgres").url_with("pool_size=2"),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let b = coatcheck_server::Server::start(cfg, listener, shutdown.clone())
        .await
        .expect("second node");
    let resp = a
        .http()
        .get(format!(
            "http://{}/v1/requests?limit=10&page_token={token}",
            b.addr()
        ))
        .send()
        .await
        .expect("list on b");
    assert_eq!(resp.status(), 200);
    let next: Value = resp.json().await.expect("JSON");
    assert_eq!(next["requests"].as_array().map(Vec::len), Some(2), "{next}");
    shutdown.cancel();
    b.join().await.expect("b stops");
    a.stop().await;
}
