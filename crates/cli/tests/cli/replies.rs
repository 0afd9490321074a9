//! `coatcheck wait` over Server-Sent Events (with its long-poll fallback)
//! and `coatcheck channel NAME` tailing a reply channel.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coatcheck_client::wire::{ClaimBody, ClaimedRequest, FailBody, HeartbeatBody};
use coatcheck_client::{Client, ErrorInfo, ReplyTo};
use coatcheck_testkit::TestServer;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client(url: &str) -> Client {
    Client::builder(url)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn claim(c: &Client, queue: &str, max: u32) -> Vec<ClaimedRequest> {
    c.claim(
        queue,
        ClaimBody {
            worker_id: "cli-test".into(),
            max: Some(max),
            lease: Some(60.0),
            wait: Some(5.0),
        },
    )
    .await
    .unwrap()
}

/// Runs `coatcheck ARGS` to completion off the async threads.
async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_coatcheck"))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run coatcheck")
    })
    .await
    .unwrap()
}

fn args(url: &str, a: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = a.iter().map(|s| s.to_string()).collect();
    v.extend(["--server".to_string(), url.to_string()]);
    v
}

fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_follows_the_event_stream_and_prints_progress() {
    let s = TestServer::start().await;
    let c = client(s.base_url());
    let sub = c.submit("follow", &1).send().await.unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_coatcheck"))
        .args(args(
            s.base_url(),
            &["wait", sub.id(), "--progress", "--timeout", "60"],
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = stderr.clone();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            seen.lock().unwrap().push(line);
        }
    });
    let job = claim(&c, "follow", 1).await.remove(0);
    // Report progress until the waiting process shows it: only the event
    // stream brings progress, a long-poll would not.
    let until = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while !stderr
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("progress: "))
    {
        assert!(
            Instant::now() < until,
            "no progress line: {:?}",
            stderr.lock().unwrap()
        );
        n += 1;
        c.heartbeat(
            &job.id,
            HeartbeatBody {
                lease_token: job.lease_token.clone(),
                progress: Some(serde_json::value::to_raw_value(&json!({"step": n})).unwrap()),
                extend: None,
            },
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.complete(&job.id, &job.lease_token, &json!({"answer": 42}))
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(lines(&out.stdout), [r#"{"answer":42}"#]);
    let progress = stderr.lock().unwrap().clone();
    assert!(
        progress
            .iter()
            .any(|l| l.starts_with("progress: {\"step\":")),
        "{progress:?}"
    );
}

/// A proxy that answers every request for an event stream with 502 and
/// relays everything else: a network that breaks SSE.
struct NoSse {
    addr: SocketAddr,
    refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl NoSse {
    async fn start(upstream: SocketAddr) -> NoSse {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refused = Arc::new(AtomicUsize::new(0));
        let r = refused.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match client.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let first_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
                    if String::from_utf8_lossy(first_line).contains("/events") {
                        r.fetch_add(1, Ordering::SeqCst);
                        let _ = client
                            .write_all(
                                b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                            )
                            .await;
                        return;
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    if server.write_all(&head).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        NoSse {
            addr,
            refused,
            task,
        }
    }
}

impl Drop for NoSse {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_falls_back_to_long_polling_when_the_stream_fails() {
    let s = TestServer::start().await;
    let proxy = NoSse::start(s.server().addr()).await;
    let url = format!("http://{}", proxy.addr);
    let c = client(s.base_url());
    let sub = c.submit("fallback", &1).send().await.unwrap();
    let waiter = tokio::spawn(run(args(&url, &["wait", sub.id(), "--timeout", "60"])));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let job = claim(&c, "fallback", 1).await.remove(0);
    c.complete(&job.id, &job.lease_token, &"via long-poll")
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("wait ends")
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(lines(&out.stdout), [r#""via long-poll""#]);
    assert!(
        proxy.refused.load(Ordering::SeqCst) >= 1,
        "the stream was tried first"
    );
    // Through the same proxy, an unknown id is still a clear error.
    let out = run(args(
        &url,
        &["wait", "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(10));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
}

/// Three requests replying to `channel`: two succeed, one fails.
async fn three_replies(c: &Client, channel: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..3 {
        let sub = c
            .submit(channel, &json!({"i": i}))
            .correlation_id(format!("c{i}"))
            .max_attempts(1)
            .reply_to(ReplyTo::Channel(channel.into()))
            .send()
            .await
            .unwrap();
        ids.push(sub.request.id);
    }
    for job in claim(c, channel, 3).await {
        if job.id == ids[2] {
            c.fail(
                &job.id,
                FailBody {
                    lease_token: job.lease_token,
                    error: ErrorInfo::new("boom", "it broke"),
                    retryable: Some(false),
                    retry_after: None,
                },
            )
            .await
            .unwrap();
        } else {
            c.complete(&job.id, &job.lease_token, &json!({"ok": job.id}))
                .await
                .unwrap();
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_prints_each_reply_and_acks_it() {
    let s = TestServer::start().await;
    let c = client(s.base_url());
    let ids = three_replies(&c, "tail").await;
    let out = run(args(
        s.base_url(),
        &["channel", "tail", "--count", "3", "--timeout", "30"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let mut got = lines(&out.stdout);
    got.sort();
    let mut want = vec![
        format!("{}\tsucceeded\tc0\t{{\"ok\":\"{}\"}}", ids[0], ids[0]),
        format!("{}\tsucceeded\tc1\t{{\"ok\":\"{}\"}}", ids[1], ids[1]),
        format!("{}\tfailed\tc2\t[boom] it broke", ids[2]),
    ];
    want.sort();
    assert_eq!(got, want);
    // Acked: nothing is left, and a tail with a timeout just stops.
    let out = run(args(s.base_url(), &["channel", "tail", "--timeout", "1"])).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_no_ack_leaves_messages_to_come_back() {
    let s = TestServer::start().await;
    let c = client(s.base_url());
    let sub = c
        .submit("q", &1)
        .correlation_id("once")
        .reply_to(ReplyTo::Channel("json-tail".into()))
        .send()
        .await
        .unwrap();
    let job = claim(&c, "q", 1).await.remove(0);
    c.complete(&job.id, &job.lease_token, &"done")
        .await
        .unwrap();

    let first = run(args(
        s.base_url(),
        &[
            "channel",
            "json-tail",
            "--no-ack",
            "--json",
            "--count",
            "1",
            "--visibility",
            "1",
            "--timeout",
            "30",
        ],
    ))
    .await;
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let m: Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(m["request_id"], sub.request.id.as_str());
    assert_eq!(m["correlation_id"], "once");
    assert_eq!(m["status"], "succeeded");
    assert_eq!(m["output"], "done");
    assert_eq!(m["delivery_count"], 1);
    assert!(m["ack_token"].is_string());

    // Not acked: after its visibility it comes back, same message id.
    let second = run(args(
        s.base_url(),
        &[
            "channel",
            "json-tail",
            "--json",
            "--count",
            "1",
            "--timeout",
            "30",
        ],
    ))
    .await;
    assert_eq!(second.status.code(), Some(0), "{second:?}");
    let again: Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(again["message_id"], m["message_id"]);
    assert_eq!(again["delivery_count"], 2);

    // Acked that time: gone. A --count not reached by --timeout is exit 5.
    let third = run(args(
        s.base_url(),
        &["channel", "json-tail", "--count", "1", "--timeout", "1"],
    ))
    .await;
    assert_eq!(third.status.code(), Some(5), "{third:?}");
    assert!(third.stdout.is_empty());
}

/// `serve --webhook-retries` sets the webhook schedule: against a receiver
/// that always fails, two short delays make three attempts, the last one
/// giving up (the default schedule's second attempt would come 5 s later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_webhook_retries_sets_the_schedule() {
    // A receiver that answers every POST with 500 and counts them.
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", receiver.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = receiver.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = sock.read(&mut buf).await;
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = sock
                    .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let server = crate::proc::Serve::start(
        dir.path(),
        &[
            "--webhook-secret",
            "whsec_MDEyMzQ1Njc4OWFiY2RlZg==",
            "--webhook-allow-private",
            "--webhook-retries",
            "0.2,0.3",
        ],
    );
    let c = client(&server.url);
    let target = coatcheck_client::WebhookTarget { url: hook };
    let id = c
        .submit("hooked", &json!({"n": 1}))
        .reply_to(ReplyTo::Webhook(target))
        .send()
        .await
        .unwrap()
        .request
        .id;
    let job = claim(&c, "hooked", 1).await.remove(0);
    c.complete(&id, &job.lease_token, &"done").await.unwrap();
    let started = Instant::now();
    let failures = loop {
        let failed: Vec<Value> = c
            .history(&id)
            .await
            .unwrap()
            .into_iter()
            .map(|e| serde_json::to_value(e.kind).unwrap())
            .filter(|k| k["kind"] == "reply_delivery_failed")
            .collect();
        if failed.len() >= 3 || started.elapsed() > Duration::from_secs(20) {
            break failed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let attempts: Vec<u64> = failures
        .iter()
        .map(|f| f["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, [1, 2, 3], "{failures:?}");
    assert!(failures[..2]
        .iter()
        .all(|f| f["next_attempt_at"].is_string()));
    assert!(
        failures[2].get("next_attempt_at").is_none(),
        "the last one gave up"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 3, "no fourth attempt");
}
