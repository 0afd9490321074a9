//! Durability: kill -9 of the server while clients submit loses nothing
//! that was acknowledged, and idempotency keys still deduplicate after it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::proc::Serve;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_submitting_loses_no_acknowledged_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = Serve::start(dir.path(), &[]);
    let url = server.url.clone();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // key -> id, for every submit that got its 202.
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..8 {
        let (http, url, acked) = (http.clone(), url.clone(), acked.clone());
        clients.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("k-{c}-{i}");
                let resp = http
                    .post(format!("{url}/v1/queues/crash/requests"))
                    .header("idempotency-key", &key)
                    .json(&json!({"input": {"c": c, "i": i}}))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == 202 => {
                        let v: Value = match r.json().await {
                            Ok(v) => v,
                            Err(_) => return,
                        };
                        acked
                            .lock()
                            .unwrap()
                            .insert(key, v["id"].as_str().unwrap().to_string());
                    }
                    _ => return, // the server is gone
                }
            }
        }));
    }
    // Let a few hundred land, then pull the plug mid-stream.
    let start = std::time::Instant::now();
    while acked.lock().unwrap().len() < 400 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    for c in clients {
        let _ = c.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 400,
        "only {} submits were acknowledged",
        acked.len()
    );

    let server = Serve::start(dir.path(), &[]);
    let url = server.url.clone();
    for id in acked.values() {
        let resp = http
            .get(format!("{url}/v1/requests/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "acknowledged request {id} lost");
    }
    // Idempotency keys survived the crash: the same key and body replay.
    for (key, id) in acked.iter().take(50) {
        let (c, i) = parse_key(key);
        let resp = http
            .post(format!("{url}/v1/queues/crash/requests"))
            .header("idempotency-key", key)
            .json(&json!({"input": {"c": c, "i": i}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "replay of {key}");
        assert_eq!(resp.headers()["idempotent-replayed"], "true");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["id"].as_str().unwrap(), id);
    }
    let status = server.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}

fn parse_key(key: &str) -> (i64, i64) {
    let mut parts = key.split('-').skip(1).map(|p| p.parse::<i64>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

#[test]
fn a_second_server_on_the_same_data_directory_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Serve::start(dir.path(), &[]);
    let out = crate::proc::run(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            dir.path().to_str().unwrap(),
        ],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another coatcheck process"), "{err}");
}

#[test]
fn bad_flags_refuse_to_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for (args, needle) in [
        (
            vec!["serve", "--listen", "nonsense", "--data", d],
            "--listen",
        ),
        (
            vec!["serve", "--listen", "0.0.0.0:0", "--data", d],
            "non-loopback",
        ),
        (
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data",
                d,
                "--max-wait",
                "5",
            ],
            "--max-wait",
        ),
        (
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data",
                d,
                "--store",
                "mysql://x",
            ],
            "--store",
        ),
        (
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data",
                d,
                "--webhook-retries",
                "5,0",
            ],
            "--webhook-retries",
        ),
        (
            vec![
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data",
                d,
                "--threads",
                "0",
            ],
            "--threads",
        ),
    ] {
        let out = crate::proc::run(&args, None);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    }
}
