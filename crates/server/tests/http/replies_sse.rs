//! `GET /v1/requests/{id}/events`: Server-Sent Events of one request, read
//! with a small parser over reqwest's byte stream ([`SseReader`], also used
//! by the channel tests) and with a real EventSource client (node's
//! `eventsource` package) when node and npm are on the machine.

use std::time::{Duration, Instant};

use coatcheck_testkit::{assert_problem, TestServer};
use futures::stream::{BoxStream, StreamExt};
use serde_json::{json, Value};

use crate::helpers::*;

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// The `event:` name ("message" if none).
    pub event: String,
    /// The `id:` field, if any.
    pub id: Option<String>,
    /// The `data:` lines, joined by newlines.
    pub data: String,
}

impl SseEvent {
    /// The data as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.data))
    }

    /// The id as a number.
    pub fn seq(&self) -> u64 {
        self.id
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no numeric id: {self:?}"))
    }
}

/// A tiny `text/event-stream` parser (the WHATWG rules this server needs).
pub struct SseReader {
    body: BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buf: Vec<u8>,
    event: String,
    id: Option<String>,
    data: Vec<String>,
    /// Comment lines seen (keep-alives).
    pub comments: usize,
}

impl SseReader {
    /// Reads `resp`'s body, asserting a 200 event stream.
    pub fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status(), 200, "an event stream from {}", resp.url());
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");
        SseReader {
            body: resp.bytes_stream().map(|r| r.map(|b| b.to_vec())).boxed(),
            buf: Vec::new(),
            event: String::new(),
            id: None,
            data: Vec::new(),
            comments: 0,
        }
    }

    /// The next event, or `None` when the stream ends. Cancel-safe.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                let line = String::from_utf8(line).expect("UTF-8 stream");
                if let Some(e) = self.line(&line) {
                    return Some(e);
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => panic!("reading the event stream: {e}"),
                None => return None,
            }
        }
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            if self.data.is_empty() {
                self.event.clear();
                return None;
            }
            let event = std::mem::take(&mut self.event);
            return Some(SseEvent {
                event: if event.is_empty() {
                    "message".into()
                } else {
                    event
                },
                id: self.id.clone(),
                data: std::mem::take(&mut self.data).join("\n"),
            });
        }
        if line.starts_with(':') {
            self.comments += 1;
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = value.to_string(),
            "data" => self.data.push(value.to_string()),
            "id" => self.id = Some(value.to_string()),
            _ => {}
        }
        None
    }

    /// The next event within `within` (panics on timeout or end of stream).
    pub async fn next(&mut self, within: Duration) -> SseEvent {
        match tokio::time::timeout(within, self.next_event()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("the stream ended, expected an event"),
            Err(_) => panic!("no event within {within:?}"),
        }
    }

    /// Asserts the stream ends within `within` with no further event.
    pub async fn expect_end(&mut self, within: Duration) {
        match tokio::time::timeout(within, self.next_event()).await {
            Ok(None) => {}
            Ok(Some(e)) => panic!("expected the stream to end, got {e:?}"),
            Err(_) => panic!("the stream did not end within {within:?}"),
        }
    }

    /// Asserts no event arrives for `dur` (the stream stays open).
    pub async fn expect_quiet(&mut self, dur: Duration) {
        if let Ok(got) = tokio::time::timeout(dur, self.next_event()).await {
            panic!("expected no event for {dur:?}, got {got:?}");
        }
    }
}

/// Opens `GET /v1/requests/{id}/events`, with `Last-Event-ID` if given.
async fn open(s: &TestServer, id: &str, last: Option<&str>) -> reqwest::Response {
    let mut req = s.http().get(s.url(&format!("/v1/requests/{id}/events")));
    if let Some(l) = last {
        req = req.header("Last-Event-ID", l);
    }
    req.send().await.expect("GET events")
}

async fn stream(s: &TestServer, id: &str, last: Option<&str>) -> SseReader {
    SseReader::new(open(s, id, last).await)
}

const SOON: Duration = Duration::from_secs(5);

/// Asserts an event's name, id and that its data is this request in `status`.
#[track_caller]
fn check(e: &SseEvent, name: &str, seq: u64, id: &str, status: &str) -> Value {
    assert_eq!((e.event.as_str(), e.seq()), (name, seq), "{e:?}");
    let r = e.json();
    assert_eq!(
        (r["id"].as_str(), r["status"].as_str()),
        (Some(id), Some(status)),
        "{e:?}"
    );
    r
}

#[tokio::test]
async fn events_follow_a_request_live_and_close_after_the_terminal_one() {
    let s = TestServer::start().await;
    let id = id(&s.submit("sse", json!({"input": 1})).await);
    let mut es = stream(&s, &id, None).await;
    check(&es.next(SOON).await, "status", 1, &id, "queued");

    let c = claim_one(&s, "sse", 30.0).await;
    check(&es.next(SOON).await, "status", 2, &id, "running");

    let body = json!({"lease_token": token(&c), "progress": {"pct": 50}});
    let ((), took) = timed(async {
        assert_eq!(heartbeat(&s, &id, body).await.status(), 200);
        let r = check(&es.next(SOON).await, "progress", 3, &id, "running");
        assert_eq!(r["progress"], json!({"pct": 50}));
    })
    .await;
    assert!(
        took < Duration::from_secs(2),
        "progress arrives promptly: {took:?}"
    );

    es.expect_quiet(Duration::from_millis(200)).await;
    let ((), took) = timed(async {
        assert_eq!(
            complete(&s, &id, &token(&c), json!({"done": true}))
                .await
                .status(),
            200
        );
        let r = check(&es.next(SOON).await, "status", 4, &id, "succeeded");
        assert_eq!(r["output"], json!({"done": true}));
    })
    .await;
    assert!(
        took < Duration::from_secs(2),
        "completion arrives promptly: {took:?}"
    );
    es.expect_end(SOON).await;
}

/// A stream that falls behind — its client stops reading, the socket's
/// buffers fill with ~1 MB events, and the server stops sending — while
/// thirty progress reports and the completion land: once the client reads
/// again, every event still carries the request as its own change left it
/// (`running` with that report's progress), not as the stream finds it when
/// it catches up (`succeeded`).
#[tokio::test]
async fn each_event_carries_the_state_its_own_change_left_even_when_the_stream_falls_behind() {
    let s = TestServer::start().await;
    let blob = "x".repeat(900 * 1024);
    let id = id(&s
        .submit("sse-behind", json!({"input": {"blob": blob}}))
        .await);
    let mut es = stream(&s, &id, None).await;
    check(&es.next(SOON).await, "status", 1, &id, "queued");
    // From here on the client reads nothing until the request is done.
    let c = claim_one(&s, "sse-behind", 60.0).await;
    for pct in 0..30 {
        let body = json!({"lease_token": token(&c), "progress": {"pct": pct}});
        assert_eq!(heartbeat(&s, &id, body).await.status(), 200);
    }
    let done = complete(&s, &id, &token(&c), json!({"done": true})).await;
    assert_eq!(done.status(), 200);

    // What each event says, without its megabyte of input.
    let mut got = Vec::new();
    for _ in 0..32 {
        let e = es.next(SOON).await;
        let r = e.json();
        got.push((
            e.event.clone(),
            e.seq(),
            r["status"].as_str().unwrap_or_default().to_string(),
            r["progress"]["pct"].as_u64(),
            r["output"] != Value::Null,
            r["input"]["blob"].as_str().map(str::len),
        ));
    }
    // Every event has the whole input (kept changes leave it out).
    let input = Some(blob.len());
    let mut want = vec![(
        "status".to_string(),
        2,
        "running".to_string(),
        None,
        false,
        input,
    )];
    for pct in 0..30u64 {
        want.push((
            "progress".into(),
            3 + pct,
            "running".into(),
            Some(pct),
            false,
            input,
        ));
    }
    want.push((
        "status".into(),
        33,
        "succeeded".into(),
        Some(29),
        true,
        input,
    ));
    assert_eq!(got, want);
    es.expect_end(SOON).await;
}

#[tokio::test]
async fn last_event_id_replays_only_what_came_after_it() {
    let s = TestServer::start().await;
    let body = json!({"input": 1, "reply_to": {"channel": "sse-replies"}});
    let id = id(&s.submit("sse", body).await);
    let c = claim_one(&s, "sse", 30.0).await;
    let beat = |pct: u32| json!({"lease_token": token(&c), "progress": {"pct": pct}});
    assert_eq!(heartbeat(&s, &id, beat(10)).await.status(), 200);

    // Resume after `submitted`: the claim and the progress, then live.
    let mut es = stream(&s, &id, Some("1")).await;
    check(&es.next(SOON).await, "status", 2, &id, "running");
    check(&es.next(SOON).await, "progress", 3, &id, "running");
    es.expect_quiet(Duration::from_millis(200)).await;
    assert_eq!(heartbeat(&s, &id, beat(20)).await.status(), 200);
    let r = check(&es.next(SOON).await, "progress", 4, &id, "running");
    assert_eq!(r["progress"], json!({"pct": 20}));
    assert_eq!(complete(&s, &id, &token(&c), json!(1)).await.status(), 200);
    check(&es.next(SOON).await, "status", 5, &id, "succeeded");
    es.expect_end(SOON).await;
    // The reply was recorded after the terminal event; it is not an SSE event.
    assert_eq!(
        kinds(&s, &id).await.last().map(String::as_str),
        Some("reply_delivered")
    );

    // A resume replays exactly what came after its id, then closes.
    let mut es = stream(&s, &id, Some("3")).await;
    check(&es.next(SOON).await, "progress", 4, &id, "succeeded");
    check(&es.next(SOON).await, "status", 5, &id, "succeeded");
    es.expect_end(SOON).await;

    // A reconnect already past the terminal event: 204, so EventSource stops.
    for last in ["5", "6"] {
        let resp = open(&s, &id, Some(last)).await;
        assert_eq!(resp.status(), 204, "Last-Event-ID {last:?}");
        assert!(resp.text().await.expect("body").is_empty());
    }
}

#[tokio::test]
async fn a_terminal_request_sends_its_state_and_closes() {
    let s = TestServer::start().await;
    let id = id(&s.submit("sse", json!({"input": 1})).await);
    assert_eq!(
        s.http()
            .delete(s.url(&format!("/v1/requests/{id}")))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (mut es, took) = timed(stream(&s, &id, None)).await;
    let e = es.next(SOON).await;
    check(&e, "status", 2, &id, "cancelled");
    es.expect_end(SOON).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Reconnecting with the id it was given: 204.
    let resp = open(&s, &id, e.id.as_deref()).await;
    assert_eq!(resp.status(), 204);
}

#[tokio::test]
async fn bad_last_event_id_is_400_and_unknown_requests_404() {
    let s = TestServer::start().await;
    let id = id(&s.submit("sse", json!({"input": 1})).await);
    for bad in ["abc", "-1", "1.5", "0x10"] {
        let p = assert_problem(open(&s, &id, Some(bad)).await, 400, "invalid-request").await;
        assert_eq!(p.extensions["field"], "Last-Event-ID", "{bad}");
    }
    let unknown = "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77";
    assert_problem(open(&s, unknown, None).await, 404, "not-found").await;
    assert_problem(open(&s, unknown, Some("3")).await, 404, "not-found").await;
    assert_problem(open(&s, "no%20such", None).await, 404, "not-found").await;
}

#[tokio::test]
async fn idle_streams_send_keep_alive_comments_and_many_streams_all_finish() {
    let s = TestServer::start_with(|c| c.sse_keep_alive = Duration::from_millis(100)).await;
    let id = id(&s.submit("sse", json!({"input": 1})).await);
    let mut streams = Vec::new();
    for _ in 0..50 {
        let mut es = stream(&s, &id, None).await;
        check(&es.next(SOON).await, "status", 1, &id, "queued");
        streams.push(es);
    }
    let first = &mut streams[0];
    first.expect_quiet(Duration::from_millis(450)).await;
    assert!(
        first.comments >= 2,
        "keep-alive comments while idle: {}",
        first.comments
    );

    let c = claim_one(&s, "sse", 30.0).await;
    assert_eq!(complete(&s, &id, &token(&c), json!(1)).await.status(), 200);
    let started = Instant::now();
    for es in &mut streams {
        check(&es.next(SOON).await, "status", 2, &id, "running");
        check(&es.next(SOON).await, "status", 3, &id, "succeeded");
        es.expect_end(SOON).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// The `eventsource` npm package, installed once per target dir; `None`
/// (with a message) when node or npm is missing.
fn eventsource_dir() -> Option<std::path::PathBuf> {
    let has = |cmd: &str| {
        std::process::Command::new(cmd)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has("node") || !has("npm") {
        println!("SKIP: the real EventSource client test needs node and npm on the PATH");
        return None;
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("eventsource-client");
    if !dir.join("node_modules/eventsource/package.json").exists() {
        std::fs::create_dir_all(&dir).expect("a dir for npm");
        let out = std::process::Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "eventsource@2",
            ])
            .current_dir(&dir)
            .output()
            .expect("run npm");
        assert!(
            out.status.success(),
            "npm install eventsource@2 failed (node is here, so this test must run): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(dir)
}

/// Collects a request's events with a real EventSource until it stops
/// reconnecting, then prints them as JSON.
const CLIENT: &str = r#"
const EventSource = require('eventsource');
const es = new EventSource(process.argv[2]);
const events = [], errors = [];
let opens = 0;
const done = (code) => {
  const state = es.readyState;
  es.close();
  console.log(JSON.stringify({events, errors, opens, state}));
  process.exit(code);
};
es.onopen = () => { opens++; if (opens === 1) console.log(JSON.stringify({open: true})); };
for (const name of ['status', 'progress']) {
  es.addEventListener(name, (e) => events.push({type: e.type, id: e.lastEventId, data: JSON.parse(e.data)}));
}
es.onerror = (e) => {
  errors.push({status: e.status === undefined ? null : e.status});
  // On a non-200 the client emits the error, then closes itself.
  setTimeout(() => { if (es.readyState === EventSource.CLOSED) done(0); }, 0);
};
setTimeout(() => done(1), 20000);
"#;

#[tokio::test]
async fn a_real_eventsource_client_follows_the_request_and_stops_after_the_terminal_event() {
    let Some(dir) = eventsource_dir() else { return };
    let s = TestServer::start().await;
    let id = id(&s.submit("sse-js", json!({"input": 1})).await);
    let script = dir.join("client.js");
    std::fs::write(&script, CLIENT).expect("write the client");
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .arg(s.url(&format!("/v1/requests/{id}/events")))
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the client connects")
        .expect("read")
        .expect("a line");
    assert_eq!(first, r#"{"open":true}"#);

    let c = claim_one(&s, "sse-js", 30.0).await;
    let beat = json!({"lease_token": token(&c), "progress": {"pct": 42}});
    assert_eq!(heartbeat(&s, &id, beat).await.status(), 200);
    assert_eq!(
        complete(&s, &id, &token(&c), json!("ok")).await.status(),
        200
    );

    let last = tokio::time::timeout(Duration::from_secs(25), lines.next_line())
        .await
        .expect("the client finishes")
        .expect("read")
        .expect("a result line");
    let status = child.wait().await.expect("node exits");
    let v: Value = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {last}"));
    assert!(status.success(), "the client timed out: {v}");
    let got: Vec<(String, String, String)> = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            assert_eq!(e["data"]["id"], id.as_str());
            let st = e["data"]["status"].as_str().unwrap_or_default().to_string();
            (
                e["type"].as_str().unwrap().to_string(),
                e["id"].as_str().unwrap().to_string(),
                st,
            )
        })
        .collect();
    let want = [
        ("status", "1", "queued"),
        ("status", "2", "running"),
        ("progress", "3", "running"),
        ("status", "4", "succeeded"),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(got, want, "{v}");
    assert_eq!(v["events"][2]["data"]["progress"], json!({"pct": 42}));
    // The stream closed after the terminal event; the client reconnected
    // with Last-Event-ID 4, got 204 and stopped for good.
    assert_eq!(v["opens"], 1, "{v}");
    let errors = v["errors"].as_array().expect("errors");
    assert_eq!(
        errors.last().map(|e| e["status"].clone()),
        Some(json!(204)),
        "{v}"
    );
    assert_eq!(v["state"], 2, "closed by the client itself: {v}");
}
