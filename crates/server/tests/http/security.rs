//! Security over real HTTP: keys (every route × role × tenant), limits (submit
//! rate, queue depth, streams per key, URL and header size, slow clients),
//! TLS, and fair claiming between a heavy and a light tenant.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coatcheck_server::keys::hash_key;
use coatcheck_server::TlsConfig;
use coatcheck_testkit::{assert_problem, TestServer};
use futures::StreamExt as _;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

const CLIENT_A: &str = "ck_test_client_tenant_a_000001";
const CLIENT_A_QA: &str = "ck_test_client_tenant_a_only_qa";
const CLIENT_B: &str = "ck_test_client_tenant_b_000001";
const WORKER: &str = "ck_test_worker_all_queues_0001";
const WORKER_Q1: &str = "ck_test_worker_only_queue_q1_1";
const ADMIN: &str = "ck_test_admin_ops_00000000001";

/// A keys file: secrets for some, hashes for others (both must work).
fn keys_toml() -> String {
    format!(
        r#"
[[key]]
name = "client-a"
secret = "{CLIENT_A}"
role = "client"
tenant = "a"

[[key]]
name = "client-a-qa"
hash = "{}"
role = "client"
tenant = "a"
queues = ["qa"]

[[key]]
name = "client-b"
hash = "{}"
role = "client"
tenant = "b"

[[key]]
name = "worker"
hash = "{}"
role = "worker"
tenant = "ops"

[[key]]
name = "worker-q1"
secret = "{WORKER_Q1}"
role = "worker"
tenant = "ops"
queues = ["q1"]

[[key]]
name = "admin"
hash = "{}"
role = "admin"
tenant = "ops"
"#,
        hash_key(CLIENT_A_QA),
        hash_key(CLIENT_B),
        hash_key(WORKER),
        hash_key(ADMIN),
    )
}

/// A server with the keys file above; `tweak` adjusts the rest.
struct Keyed {
    s: TestServer,
    keys_path: PathBuf,
    _dir: tempfile::TempDir,
}

async fn keyed(tweak: impl Fn(&mut coatcheck_server::Config) + Send + Sync + 'static) -> Keyed {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys_path = dir.path().join("keys.toml");
    std::fs::write(&keys_path, keys_toml()).expect("write keys");
    let p = keys_path.clone();
    let s = TestServer::start_with(move |cfg| {
        cfg.keys_file = Some(p.clone());
        tweak(cfg);
    })
    .await;
    Keyed {
        s,
        keys_path,
        _dir: dir,
    }
}

/// One call with an optional bearer key and an optional JSON body.
async fn call(
    s: &TestServer,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut b = s.http().request(method, s.url(path));
    if let Some(k) = key {
        b = b.bearer_auth(k);
    }
    if let Some(v) = body {
        b = b.json(v);
    }
    b.send().await.expect("HTTP call")
}

async fn get_as(s: &TestServer, path: &str, key: &str) -> reqwest::Response {
    call(s, Method::GET, path, Some(key), None).await
}

async fn post_as(s: &TestServer, path: &str, key: &str, body: Value) -> reqwest::Response {
    call(s, Method::POST, path, Some(key), Some(&body)).await
}

/// Submits as `key` (asserting 202) and returns the Request.
async fn submit_as(s: &TestServer, key: &str, queue: &str, body: Value) -> Value {
    json_of(
        post_as(s, &format!("/v1/queues/{queue}/requests"), key, body).await,
        202,
    )
    .await
}

/// Claims up to `max` from `queue` as `key` without waiting.
async fn claim_as(s: &TestServer, key: &str, queue: &str, max: u32) -> Vec<Value> {
    let v = json_of(
        post_as(
            s,
            &format!("/v1/queues/{queue}/claims"),
            key,
            json!({"worker_id": "w-sec", "max": max}),
        )
        .await,
        200,
    )
    .await;
    v["requests"].as_array().cloned().expect("requests")
}

/// The `/metrics` text (read with the admin key).
async fn metrics(s: &TestServer) -> String {
    let r = get_as(s, "/metrics", ADMIN).await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("metrics text")
}

fn refused_count(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("coatcheck_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|n| n.trim().parse().expect("a count"))
        .unwrap_or(0)
}

fn assert_integer_retry_after(resp: &reqwest::Response) -> u64 {
    let v = resp
        .headers()
        .get("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on {}", resp.url()))
        .to_str()
        .expect("ascii");
    let n: u64 = v
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {v:?} is not an integer"));
    assert!(n >= 1, "Retry-After {n}");
    n
}

async fn assert_unauthorized(resp: reqwest::Response, what: &str) {
    let www = resp
        .headers()
        .get("www-authenticate")
        .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"))
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(www.starts_with("Bearer"), "{what}: WWW-Authenticate {www}");
    assert_problem(resp, 401, "unauthorized").await;
}

/// A route, its body, and what a client (of the owning tenant), a worker
/// and an admin get.
struct Case {
    method: Method,
    path: String,
    body: Option<Value>,
    expect: [u16; 3],
}

fn case(method: Method, path: &str, body: Option<Value>, expect: [u16; 3]) -> Case {
    Case {
        method,
        path: path.to_string(),
        body,
        expect,
    }
}

#[tokio::test]
async fn every_route_by_role_and_without_a_valid_key() {
    let k = keyed(|_| {}).await;
    let s = &k.s;
    let r = submit_as(s, CLIENT_A, "q1", json!({"input": 1})).await;
    let rid = id(&r);
    let bogus = json!({"lease_token": "not-a-lease"});
    let fail_body = json!({"lease_token": "not-a-lease", "error": {"code": "x", "message": "y"}});
    let cases = [
        case(
            Method::POST,
            "/v1/queues/q1/requests",
            Some(json!({"input": 2})),
            [202, 403, 202],
        ),
        case(Method::GET, "/v1/requests", None, [200, 403, 200]),
        case(
            Method::GET,
            &format!("/v1/requests/{rid}"),
            None,
            [200, 403, 200],
        ),
        case(
            Method::GET,
            &format!("/v1/requests/{rid}/result"),
            None,
            [202, 403, 202],
        ),
        case(
            Method::GET,
            &format!("/v1/requests/{rid}/history"),
            None,
            [200, 403, 200],
        ),
        case(
            Method::GET,
            &format!("/v1/requests/{rid}/events"),
            None,
            [200, 403, 200],
        ),
        case(
            Method::POST,
            &format!("/v1/requests/{rid}/redrive"),
            None,
            [403, 403, 409],
        ),
        case(
            Method::POST,
            "/v1/queues/empty/claims",
            Some(json!({"worker_id": "w", "max": 1})),
            [403, 200, 200],
        ),
        case(
            Method::POST,
            "/v1/queues/q1/settlements",
            Some(json!({"items": [{"id": rid, "lease_token": "not-a-lease", "output": 1}]})),
            [403, 200, 200],
        ),
        case(
            Method::POST,
            &format!("/v1/requests/{rid}/heartbeat"),
            Some(bogus.clone()),
            [403, 409, 409],
        ),
        case(
            Method::POST,
            &format!("/v1/requests/{rid}/complete"),
            Some(json!({"lease_token": "not-a-lease", "output": 1})),
            [403, 409, 409],
        ),
        case(
            Method::POST,
            &format!("/v1/requests/{rid}/fail"),
            Some(fail_body),
            [403, 409, 409],
        ),
        case(
            Method::GET,
            "/v1/channels/c1/messages",
            None,
            [200, 403, 200],
        ),
        case(
            Method::POST,
            "/v1/channels/c1/ack",
            Some(json!({"ack_tokens": ["not-a-token"]})),
            [200, 403, 200],
        ),
        case(Method::GET, "/v1/channels/c1/events", None, [200, 403, 200]),
        case(Method::GET, "/v1/queues", None, [403, 403, 200]),
        case(Method::GET, "/metrics", None, [403, 403, 200]),
        case(Method::GET, "/", None, [403, 403, 200]),
    ];
    for c in &cases {
        let what = format!("{} {}", c.method, c.path);
        let b = c.body.as_ref();
        assert_unauthorized(call(s, c.method.clone(), &c.path, None, b).await, &what).await;
        assert_unauthorized(
            call(
                s,
                c.method.clone(),
                &c.path,
                Some("ck_not_a_key_of_this_server"),
                b,
            )
            .await,
            &what,
        )
        .await;
        for (key, want) in [CLIENT_A, WORKER, ADMIN].into_iter().zip(c.expect) {
            let resp = call(s, c.method.clone(), &c.path, Some(key), b).await;
            let got = resp.status().as_u16();
            assert_eq!(got, want, "{what} with {key}");
            if got == 403 {
                assert_problem(resp, 403, "forbidden").await;
            }
            // SSE responses are dropped here, closing their streams.
        }
    }
    // Cancel changes the request: a fresh one for each role.
    for (key, want) in [(CLIENT_A, 200), (WORKER, 403), (ADMIN, 200)] {
        let r = submit_as(s, CLIENT_A, "q1", json!({"input": "c"})).await;
        let path = format!("/v1/requests/{}", id(&r));
        assert_unauthorized(call(s, Method::DELETE, &path, None, None).await, "cancel").await;
        let resp = call(s, Method::DELETE, &path, Some(key), None).await;
        assert_eq!(resp.status().as_u16(), want, "cancel with {key}");
    }
    // Redrive by an admin works across tenants (the cancelled ones above).
    let cancelled = json_of(
        get_as(s, "/v1/requests?status=cancelled&limit=1", ADMIN).await,
        200,
    )
    .await;
    let cid = id(&cancelled["requests"][0]);
    json_of(
        call(
            s,
            Method::POST,
            &format!("/v1/requests/{cid}/redrive"),
            Some(ADMIN),
            None,
        )
        .await,
        200,
    )
    .await;
    // Health, readiness and the API description need no key.
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        assert_eq!(s.get(path).await.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn a_key_must_match_exactly_whatever_its_length() {
    let k = keyed(|_| {}).await;
    let s = &k.s;
    let ok = |r: reqwest::Response| async move { r.status().as_u16() };
    assert_eq!(ok(get_as(s, "/v1/requests", CLIENT_A).await).await, 200);
    let mut last_changed = CLIENT_A.to_string();
    last_changed.pop();
    last_changed.push('X');
    let near_misses = [
        CLIENT_A[..CLIENT_A.len() - 1].to_string(), // a prefix
        CLIENT_A[..1].to_string(),                  // a one-character prefix
        format!("{CLIENT_A}x"),                     // one more character
        format!("{CLIENT_A}{CLIENT_A}"),            // twice
        last_changed,                               // same length, last char differs
        CLIENT_A.to_uppercase(),                    // case matters
        hash_key(CLIENT_A),                         // the file's hash is not the key
        hash_key(CLIENT_B),                         // nor is a stored hash
        "x".repeat(4096),                           // long
    ];
    for wrong in &near_misses {
        assert_unauthorized(
            call(s, Method::GET, "/v1/requests", Some(wrong), None).await,
            wrong,
        )
        .await;
    }
    // Malformed Authorization headers: 401, never a pass.
    for header in [
        "".to_string(),
        "Bearer".to_string(),
        "Bearer ".to_string(),
        format!("Basic {CLIENT_A}"),
        CLIENT_A.to_string(),
        format!("Token {CLIENT_A}"),
    ] {
        let resp = s
            .http()
            .get(s.url("/v1/requests"))
            .header("authorization", &header)
            .send()
            .await
            .unwrap();
        assert_unauthorized(resp, &header).await;
    }
    // The scheme is case-insensitive and surrounding blanks do not matter.
    for header in [format!("bearer {CLIENT_A}"), format!("Bearer  {CLIENT_A} ")] {
        let resp = s
            .http()
            .get(s.url("/v1/requests"))
            .header("authorization", &header)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{header:?}");
    }
}

#[tokio::test]
async fn tenants_see_only_their_own_requests_and_channels() {
    let k = keyed(|_| {}).await;
    let s = &k.s;
    let a = submit_as(
        s,
        CLIENT_A,
        "q1",
        json!({"input": "a", "reply_to": {"channel": "c1"}, "correlation_id": "same"}),
    )
    .await;
    let b = submit_as(
        s,
        CLIENT_B,
        "q1",
        json!({"input": "b", "correlation_id": "same"}),
    )
    .await;
    let (aid, bid) = (id(&a), id(&b));
    // The other tenant's request is exactly as absent as one that never existed.
    let never = "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77";
    for (method, suffix) in [
        (Method::GET, ""),
        (Method::GET, "/result"),
        (Method::GET, "/events"),
        (Method::GET, "/history"),
        (Method::DELETE, ""),
    ] {
        let theirs = call(
            s,
            method.clone(),
            &format!("/v1/requests/{aid}{suffix}"),
            Some(CLIENT_B),
            None,
        )
        .await;
        let p1 = assert_problem(theirs, 404, "not-found").await;
        let missing = call(
            s,
            method.clone(),
            &format!("/v1/requests/{never}{suffix}"),
            Some(CLIENT_B),
            None,
        )
        .await;
        let p2 = assert_problem(missing, 404, "not-found").await;
        assert_eq!(
            (p1.type_, p1.title),
            (p2.type_, p2.title),
            "{method} {suffix}"
        );
        let _ = p1.detail;
    }
    assert_eq!(
        get_req_as(s, &aid, CLIENT_A).await["status"],
        "queued",
        "B's cancel did nothing"
    );
    // Lists: each tenant its own, even under the same correlation id; the admin all.
    for (key, want) in [(CLIENT_A, vec![aid.clone()]), (CLIENT_B, vec![bid.clone()])] {
        for q in ["", "?correlation_id=same", "?queue=q1&status=queued"] {
            let v = json_of(get_as(s, &format!("/v1/requests{q}"), key).await, 200).await;
            let ids: Vec<String> = v["requests"].as_array().unwrap().iter().map(id).collect();
            assert_eq!(ids, want, "{key} {q}");
        }
    }
    let all = json_of(get_as(s, "/v1/requests", ADMIN).await, 200).await;
    assert_eq!(all["requests"].as_array().unwrap().len(), 2);
    // Idempotency keys are per tenant: the same key in B is a new request.
    let idem = |key: &'static str| {
        s.http()
            .post(s.url("/v1/queues/q1/requests"))
            .bearer_auth(key)
            .header("idempotency-key", "k-1")
            .json(&json!({"input": "same"}))
            .send()
    };
    let ia = json_of(idem(CLIENT_A).await.unwrap(), 202).await;
    let ib = json_of(idem(CLIENT_B).await.unwrap(), 202).await;
    assert_ne!(id(&ia), id(&ib));
    assert_eq!(idem(CLIENT_A).await.unwrap().status(), 200, "A's replay");
    // A's reply lands in A's channel c1; B's c1 is another channel.
    let c = claim_as(s, WORKER, "q1", 10).await;
    let mine = c.iter().find(|x| id(x) == aid).expect("a claimed");
    json_of(
        post_as(
            s,
            &format!("/v1/requests/{aid}/complete"),
            WORKER,
            json!({"lease_token": token(mine), "output": "done"}),
        )
        .await,
        200,
    )
    .await;
    let none = json_of(get_as(s, "/v1/channels/c1/messages", CLIENT_B).await, 200).await;
    assert_eq!(none["messages"], json!([]));
    let got = json_of(
        get_as(s, "/v1/channels/c1/messages?wait=5", CLIENT_A).await,
        200,
    )
    .await;
    let msg = &got["messages"][0];
    assert_eq!(msg["request_id"], aid.as_str(), "{got}");
    let ack = msg["ack_token"].as_str().unwrap();
    // B cannot acknowledge (and so delete) A's message.
    let v = json_of(
        post_as(
            s,
            "/v1/channels/c1/ack",
            CLIENT_B,
            json!({"ack_tokens": [ack]}),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(v["acked"], json!([]));
    let v = json_of(
        post_as(
            s,
            "/v1/channels/c1/ack",
            CLIENT_A,
            json!({"ack_tokens": [ack]}),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(v["acked"], json!([ack]));
    // The admin role is tenant-wide for requests; redrive is admin-only.
    assert_eq!(
        call(
            s,
            Method::POST,
            &format!("/v1/requests/{aid}/redrive"),
            Some(CLIENT_A),
            None
        )
        .await
        .status(),
        403
    );
}

async fn get_req_as(s: &TestServer, rid: &str, key: &str) -> Value {
    json_of(get_as(s, &format!("/v1/requests/{rid}"), key).await, 200).await
}

#[tokio::test]
async fn queue_allowlists_confine_workers_and_clients() {
    let k = keyed(|_| {}).await;
    let s = &k.s;
    // A client key limited to qa may submit there only.
    submit_as(s, CLIENT_A_QA, "qa", json!({"input": 1})).await;
    let refused = post_as(
        s,
        "/v1/queues/qb/requests",
        CLIENT_A_QA,
        json!({"input": 1}),
    )
    .await;
    assert_problem(refused, 403, "forbidden").await;
    // A worker key limited to q1: claims and settlements elsewhere are 403.
    let r1 = submit_as(s, CLIENT_A, "q1", json!({"input": 1})).await;
    let r2 = submit_as(s, CLIENT_A, "q2", json!({"input": 2})).await;
    for path in ["/v1/queues/q2/claims", "/v1/queues/q2/settlements"] {
        let body = if path.ends_with("claims") {
            json!({"worker_id": "w", "max": 1})
        } else {
            json!({"items": [{"id": id(&r2), "lease_token": "t", "output": 1}]})
        };
        assert_problem(post_as(s, path, WORKER_Q1, body).await, 403, "forbidden").await;
    }
    let c2 = claim_as(s, WORKER, "q2", 1).await;
    assert_eq!(id(&c2[0]), id(&r2));
    let t2 = token(&c2[0]);
    // ...and a request on another queue is not there for it (404), even
    // with its valid lease token; the unrestricted worker's calls work.
    let r2id = id(&r2);
    for (suffix, body) in [
        ("heartbeat", json!({"lease_token": t2})),
        (
            "fail",
            json!({"lease_token": t2, "error": {"code": "x", "message": "y"}}),
        ),
        ("complete", json!({"lease_token": t2, "output": 1})),
    ] {
        let resp = post_as(s, &format!("/v1/requests/{r2id}/{suffix}"), WORKER_Q1, body).await;
        assert_problem(resp, 404, "not-found").await;
    }
    assert_eq!(
        get_req_as(s, &r2id, ADMIN).await["status"],
        "running",
        "untouched"
    );
    // A q1 settlement naming the q2 request: that item is 404.
    let v = json_of(
        post_as(
            s,
            "/v1/queues/q1/settlements",
            WORKER_Q1,
            json!({"items": [{"id": r2id, "lease_token": t2, "output": 1}]}),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(v["items"][0]["status"], 404, "{v}");
    assert_eq!(
        get_req_as(s, &r2id, ADMIN).await["status"],
        "running",
        "untouched"
    );
    // On its own queue it works.
    let c1 = claim_as(s, WORKER_Q1, "q1", 1).await;
    assert_eq!(id(&c1[0]), id(&r1));
    json_of(
        post_as(
            s,
            &format!("/v1/requests/{}/complete", id(&r1)),
            WORKER_Q1,
            json!({"lease_token": token(&c1[0]), "output": "ok"}),
        )
        .await,
        200,
    )
    .await;
    json_of(
        post_as(
            s,
            &format!("/v1/requests/{r2id}/complete"),
            WORKER,
            json!({"lease_token": t2, "output": "ok"}),
        )
        .await,
        200,
    )
    .await;
}

#[tokio::test]
async fn an_empty_keys_file_lets_no_one_in_and_keys_reload() {
    let k = keyed(|_| {}).await;
    let s = &k.s;
    assert_eq!(get_as(s, "/v1/requests", CLIENT_A).await.status(), 200);
    // A keys file emptied (or read half-written) must not open the server.
    std::fs::write(&k.keys_path, "").unwrap();
    assert_eq!(s.server().engine().reload_keys(), Ok(0));
    assert_unauthorized(
        call(s, Method::GET, "/v1/requests", None, None).await,
        "no key",
    )
    .await;
    assert_unauthorized(get_as(s, "/v1/requests", ADMIN).await, "admin").await;
    // A broken file keeps the keys in force.
    std::fs::write(&k.keys_path, keys_toml()).unwrap();
    assert_eq!(s.server().engine().reload_keys(), Ok(6));
    std::fs::write(&k.keys_path, "[[key]]\nrole = \"boss\"\n").unwrap();
    assert!(s.server().engine().reload_keys().is_err());
    assert_eq!(get_as(s, "/v1/requests", CLIENT_A).await.status(), 200);
}

#[tokio::test]
async fn a_submit_burst_over_the_rate_is_refused_and_harms_nothing() {
    let k = keyed(|cfg| {
        // One token per 5 s, five in the bucket: a burst gets exactly five in.
        cfg.limits.submit_rate = Some(0.2);
        cfg.limits.submit_burst = Some(5.0);
    })
    .await;
    let s = &k.s;
    let before = submit_as(s, CLIENT_A, "q1", json!({"input": "before"})).await;
    let claimed = claim_as(s, WORKER, "q1", 1).await;
    assert_eq!(id(&claimed[0]), id(&before));
    let burst =
        (0..20).map(|i| post_as(s, "/v1/queues/q1/requests", CLIENT_A, json!({"input": i})));
    let resps = futures::future::join_all(burst).await;
    let mut accepted = 0;
    for resp in resps {
        match resp.status().as_u16() {
            202 => accepted += 1,
            429 => {
                let secs = assert_integer_retry_after(&resp);
                assert!(secs <= 5, "Retry-After {secs}");
                let p = assert_problem(resp, 429, "too-many-requests").await;
                assert_eq!(p.extensions["limit"], "submit_rate");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        accepted, 4,
        "five tokens: one for `before`, four for the burst"
    );
    // Another tenant has its own bucket.
    submit_as(s, CLIENT_B, "q1", json!({"input": "b"})).await;
    // Nothing refused was stored, nothing stored was touched.
    let listed = json_of(get_as(s, "/v1/requests?limit=100", CLIENT_A).await, 200).await;
    assert_eq!(listed["requests"].as_array().unwrap().len(), 5);
    let queues = json_of(get_as(s, "/v1/queues", ADMIN).await, 200).await;
    assert_eq!(
        queues["queues"][0]["counts"],
        json!({"queued": 5, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0, "expired": 0})
    );
    let kept = get_req_as(s, &id(&before), CLIENT_A).await;
    assert_eq!(
        (kept["status"].as_str(), kept["attempts"].as_u64()),
        (Some("running"), Some(1))
    );
    json_of(
        post_as(
            s,
            &format!("/v1/requests/{}/complete", id(&before)),
            WORKER,
            json!({"lease_token": token(&claimed[0]), "output": 1}),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(refused_count(&metrics(s).await, "submit_rate"), 16);
}

#[tokio::test]
async fn a_full_queue_refuses_submits_until_it_drains() {
    let k = keyed(|cfg| {
        cfg.limits.max_queue_depth = Some(3);
        cfg.limits.queue_depth.insert("big".into(), 10);
    })
    .await;
    let s = &k.s;
    for i in 0..3 {
        submit_as(s, CLIENT_A, "q1", json!({"input": i})).await;
    }
    let resp = post_as(s, "/v1/queues/q1/requests", CLIENT_B, json!({"input": 9})).await;
    assert_integer_retry_after(&resp);
    let p = assert_problem(resp, 429, "too-many-requests").await;
    assert_eq!(p.extensions["limit"], "queue_depth");
    // Other queues, and a queue with its own larger limit, are not affected.
    submit_as(s, CLIENT_A, "q2", json!({"input": 1})).await;
    for i in 0..10 {
        submit_as(s, CLIENT_A, "big", json!({"input": i})).await;
    }
    assert_eq!(
        post_as(s, "/v1/queues/big/requests", CLIENT_A, json!({"input": 11}))
            .await
            .status(),
        429
    );
    // Claiming one makes room (the depth is re-read within 100 ms).
    assert_eq!(claim_as(s, WORKER, "q1", 1).await.len(), 1);
    let start = Instant::now();
    loop {
        let resp = post_as(s, "/v1/queues/q1/requests", CLIENT_A, json!({"input": 4})).await;
        if resp.status() == 202 {
            break;
        }
        assert_eq!(resp.status(), 429);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no room after a claim"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = json_of(
        get_as(s, "/v1/requests?queue=q1&limit=100", ADMIN).await,
        200,
    )
    .await;
    assert_eq!(listed["requests"].as_array().unwrap().len(), 4);
    assert!(refused_count(&metrics(s).await, "queue_depth") >= 2);
}

#[tokio::test]
async fn open_streams_are_capped_per_key() {
    let k = keyed(|cfg| cfg.limits.max_streams_per_key = 2).await;
    let s = &k.s;
    let r = submit_as(s, CLIENT_A, "q1", json!({"input": 1})).await;
    let events = format!("/v1/requests/{}/events", id(&r));
    let first = get_as(s, &events, CLIENT_A).await;
    assert_eq!(first.status(), 200);
    let second = get_as(s, "/v1/channels/c1/events", CLIENT_A).await;
    assert_eq!(second.status(), 200);
    // A third stream, or a long-poll, of the same key: 429.
    for path in [events.as_str(), "/v1/channels/c1/messages?wait=5"] {
        let resp = get_as(s, path, CLIENT_A).await;
        assert_integer_retry_after(&resp);
        let p = assert_problem(resp, 429, "too-many-requests").await;
        assert_eq!(p.extensions["limit"], "streams");
    }
    let claim = post_as(
        s,
        "/v1/queues/none/claims",
        ADMIN,
        json!({"worker_id": "w", "wait": 0.1}),
    )
    .await;
    assert_eq!(
        claim.status(),
        200,
        "another key (the admin) has its own slots"
    );
    // Calls that do not wait are not limited; another key of the tenant has its own slots.
    assert_eq!(
        get_as(s, "/v1/channels/c1/messages", CLIENT_A)
            .await
            .status(),
        200
    );
    assert_eq!(get_as(s, &events, CLIENT_A_QA).await.status(), 200);
    // Closing a stream frees its slot.
    drop(first);
    let start = Instant::now();
    loop {
        let resp = get_as(s, &events, CLIENT_A).await;
        if resp.status() == 200 {
            break;
        }
        assert_eq!(resp.status(), 429);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(second);
    assert!(refused_count(&metrics(s).await, "streams") >= 2);
}

#[tokio::test]
async fn long_urls_and_large_headers_are_refused_as_problems() {
    let k = keyed(|_| {}).await;
    let s = &k.s;
    let long = format!("/v1/requests?correlation_id={}", "x".repeat(9 * 1024));
    let resp = get_as(s, &long, CLIENT_A).await;
    assert_problem(resp, 414, "uri-too-long").await;
    let mut b = s.http().get(s.url("/v1/requests")).bearer_auth(CLIENT_A);
    for i in 0..5 {
        b = b.header(format!("x-padding-{i}"), "p".repeat(8 * 1024));
    }
    assert_problem(b.send().await.unwrap(), 431, "headers-too-large").await;
    // Refused before authentication: no key needed to be told.
    let resp = call(s, Method::GET, &long, None, None).await;
    assert_eq!(resp.status(), 414);
    let m = metrics(s).await;
    assert_eq!(refused_count(&m, "url_size"), 2);
    assert_eq!(refused_count(&m, "header_size"), 1);
}

/// Opens a raw TCP connection to the server.
fn raw(s: &TestServer) -> std::net::TcpStream {
    let c = std::net::TcpStream::connect(s.server().addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// Reads until the peer closes (or the read timeout); returns what came and
/// how long it took.
fn read_to_close(c: &mut std::net::TcpStream) -> (String, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still open after {:?}: {e}", start.elapsed()),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off_but_long_polls_are_not() {
    let s = TestServer::start_with(|cfg| {
        cfg.header_read_timeout = Duration::from_secs(1);
        cfg.body_read_timeout = Duration::from_secs(1);
    })
    .await;
    let addr_s = &s;
    // A request head that never ends: closed after about a second.
    let slow = tokio::task::spawn_blocking({
        let mut c = raw(addr_s);
        move || {
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            read_to_close(&mut c)
        }
    });
    // An idle keep-alive connection after one answered call: closed too.
    let idle = tokio::task::spawn_blocking({
        let mut c = raw(addr_s);
        move || {
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            read_to_close(&mut c)
        }
    });
    // A body that never ends: 408, a problem document.
    let body = tokio::task::spawn_blocking({
        let mut c = raw(addr_s);
        move || {
            c.write_all(
                b"POST /v1/queues/q/requests HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"input\":",
            )
            .unwrap();
            read_to_close(&mut c)
        }
    });
    // A long-poll longer than the header timeout is answered as usual.
    let r = s.submit("q", json!({"input": 1})).await;
    let (resp, took) = timed(s.get(&format!("/v1/requests/{}?wait=2", id(&r)))).await;
    assert_eq!(resp.status(), 200);
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    let (text, took) = slow.await.unwrap();
    assert!(text.is_empty(), "{text}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (text, took) = idle.await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (text, _) = body.await.unwrap();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("application/problem+json"), "{text}");
    assert!(text.contains("request-timeout"), "{text}");
    let m = s.get("/metrics").await.text().await.unwrap();
    assert_eq!(
        refused_count(&m, "header_timeout"),
        1,
        "only the slow one: {m}"
    );
    assert_eq!(refused_count(&m, "body_timeout"), 1);
}

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM
/// files; returns the certificate PEM.
fn write_cert(dir: &Path) -> String {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let pem = ck.cert.pem();
    std::fs::write(dir.join("cert.pem"), &pem).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    pem
}

fn trusting(pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test]
async fn tls_serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pem = write_cert(dir.path());
    let files = TlsConfig {
        cert_path: dir.path().join("cert.pem"),
        key_path: dir.path().join("key.pem"),
    };
    let f = files.clone();
    let s = TestServer::start_with(move |cfg| cfg.tls = Some(f.clone())).await;
    let url = s.server().url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let port = s.server().addr().port();
    let client = trusting(&pem);
    for base in [url.clone(), format!("https://localhost:{port}")] {
        let resp = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{base}");
    }
    let resp = client
        .post(format!("{url}/v1/queues/q/requests"))
        .json(&json!({"input": "over tls"}))
        .send()
        .await
        .unwrap();
    let r = json_of(resp, 202).await;
    assert_eq!(r["input"], "over tls");
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = s
        .http()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    // A client that does not trust the certificate refuses it.
    let untrusting = reqwest::Client::builder().build().unwrap();
    assert!(untrusting
        .get(format!("{url}/healthz"))
        .send()
        .await
        .is_err());
    // A renewed certificate takes effect on reload, for new connections.
    let pem2 = write_cert(dir.path());
    assert!(s.server().reload_tls().unwrap());
    let fresh = trusting(&pem2);
    assert_eq!(
        fresh
            .get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let old = trusting(&pem);
    assert!(old.get(format!("{url}/healthz")).send().await.is_err());
    // A broken file is refused, and the certificate in force stays.
    std::fs::write(&files.key_path, "not a key").unwrap();
    let e = s.server().reload_tls().unwrap_err().to_string();
    assert!(e.contains("key.pem"), "{e}");
    assert!(
        !e.contains("not a key"),
        "the error must not echo the file: {e}"
    );
    assert_eq!(
        fresh
            .get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn a_tls_handshake_that_never_comes_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let pem = write_cert(dir.path());
    let files = TlsConfig {
        cert_path: dir.path().join("cert.pem"),
        key_path: dir.path().join("key.pem"),
    };
    let s = TestServer::start_with(move |cfg| {
        cfg.tls = Some(files.clone());
        cfg.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let silent = tokio::task::spawn_blocking({
        let mut c = raw(&s);
        move || read_to_close(&mut c)
    });
    let (text, took) = silent.await.unwrap();
    assert!(text.is_empty(), "{text}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let m = trusting(&pem)
        .get(format!("{}/metrics", s.server().url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(refused_count(&m, "tls_handshake_timeout"), 1, "{m}");
}

#[tokio::test]
async fn a_server_with_a_bad_certificate_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path());
    let mut cfg = coatcheck_server::Config::embedded(dir.path().join("data"));
    cfg.tls = Some(TlsConfig {
        cert_path: dir.path().join("cert.pem"),
        key_path: dir.path().join("missing.pem"),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = coatcheck_server::Server::start(cfg, listener, Default::default())
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("missing.pem"), "{e:#}");
}

#[tokio::test]
async fn a_light_tenant_is_not_stuck_behind_a_heavy_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[key]]\nsecret = \"{CLIENT_A}\"\nrole = \"client\"\ntenant = \"heavy\"\n\n\
             [[key]]\nsecret = \"{CLIENT_B}\"\nrole = \"client\"\ntenant = \"light\"\n\n\
             [[key]]\nsecret = \"{WORKER}\"\nrole = \"worker\"\ntenant = \"ops\"\n"
        ),
    )
    .unwrap();
    let s = Arc::new(TestServer::start_with(move |cfg| cfg.keys_file = Some(keys.clone())).await);
    // 500 heavy requests first (eight at a time), then 5 light ones.
    let heavy = futures::stream::iter(0..500)
        .map(|i| {
            let s = s.clone();
            async move {
                submit_as(
                    &s,
                    CLIENT_A,
                    "work",
                    json!({"input": {"t": "heavy", "i": i}}),
                )
                .await;
            }
        })
        .buffer_unordered(8);
    heavy.collect::<Vec<()>>().await;
    for i in 0..5 {
        submit_as(
            &s,
            CLIENT_B,
            "work",
            json!({"input": {"t": "light", "i": i}}),
        )
        .await;
    }
    // One worker, one claim at a time.
    let mut order = Vec::new();
    for _ in 0..20 {
        let c = claim_as(&s, WORKER, "work", 1).await;
        order.push(c[0]["input"]["t"].as_str().unwrap().to_string());
    }
    let last_light = order.iter().rposition(|t| t == "light").unwrap();
    assert_eq!(
        order.iter().filter(|t| *t == "light").count(),
        5,
        "{order:?}"
    );
    assert!(last_light < 10, "light claims at {order:?}");
}
