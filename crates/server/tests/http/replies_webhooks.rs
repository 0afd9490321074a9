//! Webhook replies against a real local receiver (axum on 127.0.0.1:0):
//! Standard Webhooks headers and signatures checked by an independent HMAC,
//! retries on the schedule (500s, timeouts, redirects), 410 and an
//! exhausted schedule end it, restarts and a stop before delivery still
//! deliver, and the submit-time refusals (no secret, SSRF guard).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use coatcheck_server::Config;
use coatcheck_testkit::{assert_problem, TestServer};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::*;

/// Secrets as an operator writes them (the first is the Standard Webhooks example).
const SECRETS: [&str; 2] = [
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24tdGVzdHM=",
];

/// What the receiver does with one delivery.
#[derive(Debug, Clone)]
enum Answer {
    Status(u16),
    /// Waits this long, then answers 200 (too late for a short timeout).
    Slow(Duration),
    /// 302 to `/elsewhere` on the same receiver.
    Redirect,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    headers: HeaderMap,
    body: String,
    at: Instant,
}

impl Hit {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header"))
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

#[derive(Clone)]
struct Shared {
    hits: Arc<Mutex<Vec<Hit>>>,
    count: Arc<tokio::sync::watch::Sender<usize>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
}

/// A webhook receiver: answers each delivery by its script (then 200).
struct Receiver {
    addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

async fn receive(State(st): State<Shared>, uri: Uri, headers: HeaderMap, body: String) -> Response {
    let hit = Hit {
        path: uri.path().to_string(),
        headers,
        body,
        at: Instant::now(),
    };
    let elsewhere = hit.path == "/elsewhere";
    st.hits.lock().unwrap().push(hit);
    st.count.send_modify(|n| *n += 1);
    if elsewhere {
        return StatusCode::OK.into_response();
    }
    let answer = st
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Answer::Status(200));
    match answer {
        Answer::Status(code) => StatusCode::from_u16(code)
            .expect("a status")
            .into_response(),
        Answer::Slow(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
        Answer::Redirect => (StatusCode::FOUND, [(header::LOCATION, "/elsewhere")]).into_response(),
    }
}

impl Receiver {
    async fn start(script: Vec<Answer>) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), script).await
    }

    async fn start_on(addr: SocketAddr, script: Vec<Answer>) -> Self {
        let listener = std::net::TcpListener::bind(addr).expect("bind the receiver");
        Self::serve(listener, script).await
    }

    async fn serve(listener: std::net::TcpListener, script: Vec<Answer>) -> Self {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
        let shared = Shared {
            hits: Arc::default(),
            count: Arc::new(tokio::sync::watch::channel(0).0),
            script: Arc::new(Mutex::new(script.into())),
        };
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(shared.clone());
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("the receiver serves");
        });
        Receiver { addr, shared, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().unwrap().clone()
    }

    /// Waits until `n` requests arrived (up to `within`); returns them all.
    async fn wait_hits(&self, n: usize, within: Duration) -> Vec<Hit> {
        let mut rx = self.shared.count.subscribe();
        let got = tokio::time::timeout(within, rx.wait_for(|c| *c >= n)).await;
        assert!(
            got.is_ok(),
            "{n} deliveries within {within:?}; got {:?}",
            self.hits()
        );
        self.hits()
    }

    /// Asserts no request arrives for `dur` beyond the `n` it has.
    async fn expect_no_more(&self, n: usize, dur: Duration) {
        let mut rx = self.shared.count.subscribe();
        let more = tokio::time::timeout(dur, rx.wait_for(|c| *c > n)).await;
        assert!(
            more.is_err(),
            "no further attempt expected; got {:?}",
            self.hits()
        );
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The decoded keys, by an independent decoding of the `whsec_` form.
fn keys(n: usize) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    SECRETS[..n]
        .iter()
        .map(|s| b64.decode(s.strip_prefix("whsec_").unwrap()).unwrap())
        .collect()
}

/// Configures signing with the first `n` secrets, private targets allowed,
/// the retry `schedule` (ms) and the per-attempt `timeout`.
fn hooks(
    n: usize,
    schedule: &[u64],
    timeout: Duration,
) -> impl Fn(&mut Config) + Send + Sync + 'static {
    let schedule: Vec<Duration> = schedule
        .iter()
        .map(|ms| Duration::from_millis(*ms))
        .collect();
    move |cfg: &mut Config| {
        cfg.webhook_secrets = SECRETS[..n]
            .iter()
            .map(|s| coatcheck_server::webhook::parse_secret(s).expect("a valid secret"))
            .collect();
        cfg.webhook_allow_private = true;
        cfg.webhook_schedule = schedule.clone();
        cfg.webhook_timeout = timeout;
    }
}

/// Checks the Standard Webhooks headers of a delivery against `keys`.
#[track_caller]
fn assert_signed(hit: &Hit, keys: &[Vec<u8>]) {
    let body = hit.json();
    let id = hit.header("webhook-id");
    assert_eq!(
        Some(id),
        body["message_id"].as_str(),
        "webhook-id is the message id"
    );
    let ts = hit.header("webhook-timestamp");
    let t: i64 = ts.parse().expect("unix seconds");
    let now = chrono::Utc::now().timestamp();
    assert!(
        (now - t).abs() <= 300,
        "timestamp {t} within ±5 min of {now}"
    );
    assert!(hit.header("content-type").starts_with("application/json"));
    let entries: Vec<&str> = hit.header("webhook-signature").split(' ').collect();
    assert_eq!(
        entries.len(),
        keys.len(),
        "one v1 entry per secret: {entries:?}"
    );
    for (entry, key) in entries.iter().zip(keys) {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{id}.{ts}.{}", hit.body).as_bytes());
        let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(
            *entry,
            format!("v1,{want}"),
            "the HMAC over id.timestamp.body"
        );
    }
}

/// Submits to `queue` replying to `url`, claims and completes; returns the id.
async fn complete_to(s: &TestServer, queue: &str, url: &str) -> String {
    let body =
        json!({"input": 1, "correlation_id": "hook-1", "reply_to": {"webhook": {"url": url}}});
    let id = id(&s.submit(queue, body).await);
    let c = claim_one(s, queue, 30.0).await;
    assert_eq!(
        complete(s, &id, &token(&c), json!({"r": 1})).await.status(),
        200
    );
    id
}

/// Polls the history until its reply events satisfy `done` (10 s at most);
/// returns the reply events.
async fn reply_events(s: &TestServer, id: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let replies: Vec<Value> = history(s, id)
            .await
            .into_iter()
            .filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("reply_")))
            .collect();
        if done(&replies) {
            return replies;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "reply events so far: {replies:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether the last reply event is `reply_delivered`, or a failure with no next attempt.
fn settled(r: &[Value]) -> bool {
    r.last()
        .is_some_and(|e| e["kind"] == "reply_delivered" || e.get("next_attempt_at").is_none())
}

/// `(kind, attempt, http_status)` of each reply event.
fn summary(r: &[Value]) -> Vec<(String, u64, Option<u64>)> {
    r.iter()
        .map(|e| {
            assert_eq!(e["target"], "webhook", "{e}");
            (
                e["kind"].as_str().unwrap().to_string(),
                e["attempt"].as_u64().unwrap(),
                e["http_status"].as_u64(),
            )
        })
        .collect()
}

fn ev(kind: &str, attempt: u64, status: Option<u64>) -> (String, u64, Option<u64>) {
    (kind.to_string(), attempt, status)
}

const FAILED: &str = "reply_delivery_failed";
const DELIVERED: &str = "reply_delivered";

#[tokio::test]
async fn a_reply_is_posted_and_signed_with_every_secret() {
    let rx = Receiver::start(vec![]).await;
    let s = TestServer::start_with(hooks(2, &[200], Duration::from_secs(5))).await;
    let id = complete_to(&s, "wh", &rx.url()).await;
    let hits = rx.wait_hits(1, Duration::from_secs(5)).await;
    let hit = &hits[0];
    assert_eq!(hit.path, "/hook");
    assert_signed(hit, &keys(2));
    let typed: coatcheck_core::wire::ReplyMessage =
        serde_json::from_str(&hit.body).expect("the body is a reply message");
    assert_eq!(
        typed.output.map(|o| o.get().to_string()).as_deref(),
        Some(r#"{"r":1}"#)
    );
    let body = hit.json();
    let mut fields: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "correlation_id",
            "error",
            "finished_at",
            "message_id",
            "output",
            "queue",
            "request_id",
            "status"
        ]
    );
    let req = get_req(&s, &id).await;
    assert_eq!(
        (body["request_id"].as_str(), body["queue"].as_str()),
        (Some(id.as_str()), Some("wh"))
    );
    assert_eq!(
        (body["status"].as_str(), body["correlation_id"].as_str()),
        (Some("succeeded"), Some("hook-1"))
    );
    assert_eq!(
        (&body["output"], &body["error"]),
        (&json!({"r": 1}), &Value::Null)
    );
    assert_eq!(ts(&body["finished_at"]), ts(&req["finished_at"]));
    let r = reply_events(&s, &id, settled).await;
    assert_eq!(summary(&r), [ev(DELIVERED, 1, Some(200))]);
    rx.expect_no_more(1, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_failing_receiver_is_retried_on_the_schedule_until_it_answers_2xx() {
    let rx = Receiver::start(vec![Answer::Status(500), Answer::Status(503)]).await;
    let s = TestServer::start_with(hooks(1, &[200, 200, 200], Duration::from_secs(5))).await;
    let id = complete_to(&s, "retry", &rx.url()).await;
    let hits = rx.wait_hits(3, Duration::from_secs(10)).await;
    for w in hits.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(
            gap >= Duration::from_millis(150),
            "backoff about 200 ms: {gap:?}"
        );
        assert!(gap < Duration::from_secs(3), "not a slow sweep: {gap:?}");
        assert_eq!(
            w[0].header("webhook-id"),
            w[1].header("webhook-id"),
            "the same message"
        );
        assert_eq!(w[0].body, w[1].body, "the same body");
    }
    for h in &hits {
        assert_signed(h, &keys(1));
    }
    let r = reply_events(&s, &id, settled).await;
    assert_eq!(
        summary(&r),
        [
            ev(FAILED, 1, Some(500)),
            ev(FAILED, 2, Some(503)),
            ev(DELIVERED, 3, Some(200))
        ]
    );
    assert!(
        r[0]["next_attempt_at"].is_string() && r[0]["message"].is_string(),
        "{}",
        r[0]
    );
    rx.expect_no_more(3, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_receiver_that_does_not_answer_in_time_is_a_failed_attempt() {
    let rx = Receiver::start(vec![Answer::Slow(Duration::from_secs(3))]).await;
    let s = TestServer::start_with(hooks(1, &[200], Duration::from_millis(300))).await;
    let id = complete_to(&s, "slow", &rx.url()).await;
    let hits = rx.wait_hits(2, Duration::from_secs(10)).await;
    let gap = hits[1].at - hits[0].at;
    assert!(
        gap >= Duration::from_millis(450),
        "timeout 0.3 s then backoff 0.2 s: {gap:?}"
    );
    assert!(
        gap < Duration::from_millis(2500),
        "the timeout cut the attempt short: {gap:?}"
    );
    let r = reply_events(&s, &id, settled).await;
    assert_eq!(
        summary(&r),
        [ev(FAILED, 1, None), ev(DELIVERED, 2, Some(200))]
    );
}

#[tokio::test]
async fn gone_stops_retrying_and_redirects_are_not_followed() {
    let rx = Receiver::start(vec![Answer::Redirect, Answer::Status(410)]).await;
    let s = TestServer::start_with(hooks(1, &[200, 200, 200], Duration::from_secs(5))).await;
    let id = complete_to(&s, "gone", &rx.url()).await;
    let r = reply_events(&s, &id, settled).await;
    assert_eq!(
        summary(&r),
        [ev(FAILED, 1, Some(302)), ev(FAILED, 2, Some(410))]
    );
    assert!(
        r[1].get("next_attempt_at").is_none(),
        "410: no next attempt: {}",
        r[1]
    );
    rx.expect_no_more(2, Duration::from_millis(800)).await;
    assert!(
        rx.hits().iter().all(|h| h.path == "/hook"),
        "the redirect was not followed"
    );
}

#[tokio::test]
async fn an_exhausted_schedule_fails_the_delivery_for_good() {
    let rx = Receiver::start(vec![Answer::Status(500); 10]).await;
    let s = TestServer::start_with(hooks(1, &[100, 100], Duration::from_secs(5))).await;
    let id = complete_to(&s, "exhaust", &rx.url()).await;
    let r = reply_events(&s, &id, settled).await;
    assert_eq!(
        summary(&r),
        [
            ev(FAILED, 1, Some(500)),
            ev(FAILED, 2, Some(500)),
            ev(FAILED, 3, Some(500))
        ]
    );
    assert!(r[1]["next_attempt_at"].is_string());
    assert!(
        r[2].get("next_attempt_at").is_none(),
        "no attempt after the schedule: {}",
        r[2]
    );
    rx.expect_no_more(3, Duration::from_millis(700)).await;
    assert_eq!(
        get_req(&s, &id).await["status"],
        "succeeded",
        "the request is unaffected"
    );
}

#[tokio::test]
async fn a_retry_pending_across_a_restart_is_still_delivered() {
    let rx = Receiver::start(vec![Answer::Status(500)]).await;
    let s = TestServer::start_with(hooks(1, &[1500], Duration::from_secs(5))).await;
    let id = complete_to(&s, "restart", &rx.url()).await;
    reply_events(&s, &id, |r| r.len() == 1).await;
    let s = s.restart().await;
    let restarted = Instant::now();
    let hits = rx.wait_hits(2, Duration::from_secs(10)).await;
    assert!(
        hits[1].at > restarted,
        "the retry came from the restarted server"
    );
    assert_signed(&hits[1], &keys(1));
    let r = reply_events(&s, &id, settled).await;
    assert_eq!(
        summary(&r),
        [ev(FAILED, 1, Some(500)), ev(DELIVERED, 2, Some(200))]
    );
}

#[tokio::test]
async fn a_stop_between_the_terminal_transition_and_delivery_still_delivers() {
    // A port with no receiver on it yet: attempts are refused.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{addr}/hook");
    // `restart()` stops the server, then configures and boots it again: the
    // second configure runs while the server is down, and brings the
    // receiver's port up then (the receiver serves it once we have it back).
    let boots = Arc::new(AtomicUsize::new(0));
    let port: Arc<Mutex<Option<std::net::TcpListener>>> = Arc::default();
    let configure = {
        let (boots, port) = (boots.clone(), port.clone());
        let base = hooks(1, &[1000, 1000], Duration::from_secs(2));
        move |cfg: &mut Config| {
            base(cfg);
            if boots.fetch_add(1, Ordering::SeqCst) == 1 {
                let l = std::net::TcpListener::bind(addr).expect("the receiver's port is free");
                *port.lock().unwrap() = Some(l);
            }
        }
    };
    let s = TestServer::start_with(configure).await;
    let id = complete_to(&s, "crash", &url).await;
    // The reply was stored with the completion; its first attempt failed.
    let r = reply_events(&s, &id, |r| !r.is_empty()).await;
    assert_eq!(summary(&r), [ev(FAILED, 1, None)]);
    assert!(r[0]["next_attempt_at"].is_string());

    let s = s.restart().await;
    assert_eq!(boots.load(Ordering::SeqCst), 2);
    let listener = port
        .lock()
        .unwrap()
        .take()
        .expect("bound while the server was down");
    let rx = Receiver::serve(listener, vec![]).await;
    let hits = rx.wait_hits(1, Duration::from_secs(10)).await;
    assert_signed(&hits[0], &keys(1));
    assert_eq!(hits[0].json()["request_id"], id.as_str());
    let r = reply_events(&s, &id, settled).await;
    assert_eq!(
        summary(&r),
        [ev(FAILED, 1, None), ev(DELIVERED, 2, Some(200))]
    );
    rx.expect_no_more(1, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn webhook_replies_need_a_signing_secret() {
    let s = TestServer::start().await;
    let body = json!({"input": 1, "reply_to": {"webhook": {"url": "https://example.com/hook"}}});
    let p = assert_problem(
        s.post("/v1/queues/nosecret/requests", body).await,
        400,
        "invalid-request",
    )
    .await;
    assert_eq!(p.extensions["field"], "reply_to.webhook.url");
    assert!(p.detail.contains("--webhook-secret"), "{}", p.detail);
    let v = json_of(s.get("/v1/requests?queue=nosecret").await, 200).await;
    assert_eq!(v["requests"], json!([]), "nothing stored");
}

#[tokio::test]
async fn private_and_loopback_targets_are_refused_at_submit() {
    let s = TestServer::start_with(|cfg| {
        cfg.webhook_secrets = vec![coatcheck_server::webhook::parse_secret(SECRETS[0]).unwrap()];
    })
    .await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/hook",
        "http://localhost:9/hook",
        "http://192.168.1.10/hook",
        "http://0.0.0.0/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "ftp://example.com/hook",
        "http://user:pw@example.com/hook",
    ] {
        let body = json!({"input": 1, "reply_to": {"webhook": {"url": url}}});
        let resp = s.post("/v1/queues/ssrf/requests", body).await;
        let p = assert_problem(resp, 400, "invalid-request").await;
        assert_eq!(p.extensions["field"], "reply_to.webhook.url", "{url}");
    }
    let v = json_of(s.get("/v1/requests?queue=ssrf").await, 200).await;
    assert_eq!(v["requests"], json!([]), "nothing stored");
}
