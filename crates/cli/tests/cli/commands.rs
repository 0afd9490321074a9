//! The client subcommands against a real server: submit (argument, file,
//! stdin), status, wait (exit code tells the outcome), cancel, queues.

use coatcheck_testkit::TestServer;
use serde_json::{json, Value};

use crate::proc::run;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

async fn run_async(args: Vec<String>, stdin: Option<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&a, stdin.as_deref())
    })
    .await
    .unwrap()
}

fn args(server: &TestServer, a: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = a.iter().map(|s| s.to_string()).collect();
    v.push("--server".into());
    v.push(server.base_url().to_string());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_from_argument_stdin_and_file_then_status_and_queues() {
    let s = TestServer::start().await;
    let out = run_async(
        args(
            &s,
            &[
                "submit",
                "cli",
                r#"{"from":"arg"}"#,
                "--correlation-id",
                "c1",
                "--metadata",
                "k=v",
            ],
        ),
        None,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let id = stdout(&out);
    let req: Value = s
        .get(&format!("/v1/requests/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(req["input"], json!({"from": "arg"}));
    assert_eq!(req["correlation_id"], "c1");
    assert_eq!(req["metadata"], json!({"k": "v"}));

    let out = run_async(
        args(&s, &["submit", "cli"]),
        Some(r#"{"from":"stdin"}"#.into()),
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let req: Value = s
        .get(&format!("/v1/requests/{}", stdout(&out)))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(req["input"], json!({"from": "stdin"}));

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("in.json");
    std::fs::write(&f, r#"{"from":"file"}"#).unwrap();
    let out = run_async(
        args(
            &s,
            &["submit", "cli", "--file", f.to_str().unwrap(), "--json"],
        ),
        None,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let req: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(req["input"], json!({"from": "file"}));
    assert_eq!(req["status"], "queued");

    let out = run_async(args(&s, &["status", &id]), None).await;
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("status:      queued"),
        "{}",
        stdout(&out)
    );
    let out = run_async(args(&s, &["queues", "--json"]), None).await;
    let q: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(q["queues"][0]["name"], "cli");
    assert_eq!(q["queues"][0]["counts"]["queued"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_prints_the_output_and_its_exit_code_tells_the_outcome() {
    let s = TestServer::start().await;
    let ok = s.submit("w", json!({"input": 1})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bad = s.submit("w", json!({"input": 2, "max_attempts": 1})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let gone = s.submit("w", json!({"input": 3})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    for c in s.claim("w", 2).await {
        let id = c["id"].as_str().unwrap();
        let (path, body) = if id == ok {
            (
                "complete",
                json!({"lease_token": c["lease_token"], "output": {"answer": 42}}),
            )
        } else {
            (
                "fail",
                json!({"lease_token": c["lease_token"], "error": {"message": "bad input"}, "retryable": false}),
            )
        };
        assert_eq!(
            s.post(&format!("/v1/requests/{id}/{path}"), body)
                .await
                .status(),
            200
        );
    }
    let out = run_async(args(&s, &["wait", &ok]), None).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), r#"{"answer":42}"#);
    let out = run_async(args(&s, &["wait", &bad]), None).await;
    assert_eq!(out.status.code(), Some(1), "failed → 1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad input"));
    let out = run_async(args(&s, &["cancel", &gone]), None).await;
    assert!(out.status.success());
    assert!(stdout(&out).starts_with("cancelled"));
    let out = run_async(args(&s, &["wait", &gone]), None).await;
    assert_eq!(out.status.code(), Some(3), "cancelled → 3");
    let pending = s.submit("w", json!({"input": 4})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = run_async(args(&s, &["wait", &pending, "--timeout", "0.5"]), None).await;
    assert_eq!(out.status.code(), Some(5), "timed out → 5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_clear_line_and_a_non_zero_exit() {
    let s = TestServer::start().await;
    let out = run_async(
        args(&s, &["status", "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77"]),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("not found"), "{err}");
    let out = run_async(args(&s, &["submit", "q", "{not json"]), None).await;
    assert_eq!(out.status.code(), Some(10));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
    let out = run(&["status", "x", "--server", "http://127.0.0.1:9"], None);
    assert_eq!(out.status.code(), Some(10));
}
