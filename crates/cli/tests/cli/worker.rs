//! `coatcheck worker -- sh -c …` end to end: a real worker process running
//! real shell scripts against a real server — JSON and text output, exit 75
//! retried, other exits failed with the stderr tail, progress from stderr
//! and from the progress fd, leases renewed while a script outlives them,
//! cancel killing the script's whole process group, SIGTERM draining.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coatcheck_client::{CancelOutcome, Client, EventKind, Request, Status};
use coatcheck_core::RetryPolicy;
use coatcheck_testkit::TestServer;
use serde_json::json;

/// A server whose retries come back quickly (tests should not wait seconds).
async fn server() -> TestServer {
    TestServer::start_with(|cfg| {
        cfg.retry = RetryPolicy {
            base: Duration::from_millis(100),
            factor: 2.0,
            max: Duration::from_secs(1),
            jitter: 0.0,
        };
    })
    .await
}

fn client(s: &TestServer) -> Client {
    Client::builder(s.base_url())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A running `coatcheck worker` process.
struct WorkerProc {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl WorkerProc {
    /// Starts `coatcheck worker --queue QUEUE FLAGS -- sh -c SCRIPT` and
    /// waits for its ready line.
    fn start(s: &TestServer, queue: &str, flags: &[&str], script: &str) -> WorkerProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_coatcheck"))
            .args(["worker", "--queue", queue, "--server", s.base_url()])
            .args(flags)
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn coatcheck worker");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains("coatcheck worker ready") {
                    let _ = tx.send(());
                }
                lines.lock().unwrap().push(line);
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the worker prints its ready line");
        WorkerProc { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Waits up to `within` for the process to exit; its exit code.
    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let until = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

async fn read_pid(path: &Path) -> u32 {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
        }
        assert!(Instant::now() < until, "{} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait(c: &Client, id: &str) -> Request {
    c.wait(id, Some(Duration::from_secs(30))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_text_output_and_exit_codes() {
    let s = server().await;
    let c = client(&s);
    // The input arrives on stdin; what to do is in it.
    let script = r#"
        input=$(cat)
        case "$input" in
          *'"echo"'*) printf '{"got": %s, "attempt": %s}\n' "$input" "$COATCHECK_ATTEMPT" ;;
          *'"text"'*) echo "hello from $COATCHECK_QUEUE" ;;
          *'"nothing"'*) ;;
          *'"flaky"'*)
            if [ "$COATCHECK_ATTEMPT" = 1 ]; then echo "busy, try later" >&2; exit 75; fi
            echo '"second time lucky"' ;;
          *'"broken"'*)
            echo "some noise" >&2
            echo "the real reason: disk full" >&2
            exit 1 ;;
          *) exit 2 ;;
        esac
    "#;
    let _w = WorkerProc::start(&s, "sh-jobs", &["--concurrency", "2"], script);

    let echo = c
        .submit("sh-jobs", &json!({"echo": [1, 2]}))
        .send()
        .await
        .unwrap();
    let text = c
        .submit("sh-jobs", &json!({"text": true}))
        .send()
        .await
        .unwrap();
    let nothing = c
        .submit("sh-jobs", &json!({"nothing": 1}))
        .send()
        .await
        .unwrap();
    let flaky = c
        .submit("sh-jobs", &json!({"flaky": 1}))
        .send()
        .await
        .unwrap();
    let broken = c
        .submit("sh-jobs", &json!({"broken": 1}))
        .send()
        .await
        .unwrap();

    let r = wait(&c, echo.id()).await;
    assert_eq!(r.status, Status::Succeeded);
    let out: serde_json::Value = serde_json::from_str(r.output.unwrap().get()).unwrap();
    assert_eq!(out, json!({"got": {"echo": [1, 2]}, "attempt": 1}));

    let r = wait(&c, text.id()).await;
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.output.unwrap().get(), r#""hello from sh-jobs""#);

    let r = wait(&c, nothing.id()).await;
    assert_eq!(r.status, Status::Succeeded);
    let out: serde_json::Value = c.result(nothing.id()).await.unwrap();
    assert_eq!(out, serde_json::Value::Null);

    // Exit 75: retried, then it succeeds.
    let r = wait(&c, flaky.id()).await;
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(r.attempts, 2);
    assert_eq!(r.output.unwrap().get(), r#""second time lucky""#);
    let history = c.history(flaky.id()).await.unwrap();
    let first = history
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::AttemptFailed { error, .. } => Some(error.clone()),
            _ => None,
        })
        .expect("the first attempt failed");
    assert_eq!(first.code.as_deref(), Some("exit_status"));
    assert_eq!(first.message, "busy, try later");
    assert_eq!(first.details, Some(json!({"exit_code": 75})));

    // Exit 1: failed for good, the stderr tail as the message.
    let r = wait(&c, broken.id()).await;
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.attempts, 1, "not retried");
    let e = r.error.unwrap();
    assert_eq!(e.code.as_deref(), Some("exit_status"));
    assert!(
        e.message.ends_with("the real reason: disk full"),
        "{}",
        e.message
    );
    assert!(e.message.contains("some noise"));
    assert_eq!(e.details, Some(json!({"exit_code": 1})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_any_exit_retries_other_codes() {
    let s = server().await;
    let c = client(&s);
    let script = r#"cat >/dev/null; if [ "$COATCHECK_ATTEMPT" -lt 3 ]; then echo "nope $COATCHECK_ATTEMPT" >&2; exit 3; fi; echo 7"#;
    let _w = WorkerProc::start(&s, "any-exit", &["--retry-on-any-exit"], script);
    let sub = c
        .submit("any-exit", &1)
        .max_attempts(3)
        .send()
        .await
        .unwrap();
    let r = wait(&c, sub.id()).await;
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(r.attempts, 3);
    assert_eq!(r.output.unwrap().get(), "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_lines_reach_the_history_and_leases_outlive_the_script() {
    let s = server().await;
    let c = client(&s);
    // About 3.5 s with 1 s leases: heartbeats must carry it.
    let script = r#"
        cat >/dev/null
        echo 'coatcheck:progress {"pct": 25}' >&2
        sleep 1
        echo '{"pct": 50}' > /dev/fd/$COATCHECK_PROGRESS_FD
        sleep 1
        echo 'coatcheck:progress three quarters' >&2
        sleep 1.5
        echo '{"done": true}'
    "#;
    let w = WorkerProc::start(&s, "progress", &["--lease", "1"], script);
    let sub = c.submit("progress", &json!({})).send().await.unwrap();
    let r = wait(&c, sub.id()).await;
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.attempts, 1, "the lease never ran out");
    let history = c.history(sub.id()).await.unwrap();
    let progress: Vec<serde_json::Value> = history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Progress { progress } => Some(progress.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        progress,
        vec![
            json!({"pct": 25}),
            json!({"pct": 50}),
            json!("three quarters")
        ],
        "{history:?}"
    );
    assert!(!history
        .iter()
        .any(|e| matches!(e.kind, EventKind::LeaseExpired { .. })));
    // Progress lines are not echoed as the script's stderr.
    assert!(!w.stderr().contains("coatcheck:progress"), "{}", w.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_kills_the_scripts_whole_process_group() {
    let s = server().await;
    let c = client(&s);
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"cat >/dev/null; sleep 300 & echo $! > {dir}/grandchild; echo $$ > {dir}/child; wait"#,
        dir = dir.path().display()
    );
    let w = WorkerProc::start(
        &s,
        "cancel-me",
        &["--lease", "1.5", "--kill-grace", "2"],
        &script,
    );
    let sub = c.submit("cancel-me", &1).send().await.unwrap();
    let child = read_pid(&dir.path().join("child")).await;
    let grandchild = read_pid(&dir.path().join("grandchild")).await;
    assert!(alive(child) && alive(grandchild));
    assert!(matches!(
        c.cancel(sub.id()).await.unwrap(),
        CancelOutcome::Requested
    ));
    let r = wait(&c, sub.id()).await;
    assert_eq!(r.status, Status::Cancelled, "{r:?}");
    let until = Instant::now() + Duration::from_secs(10);
    while (alive(child) || alive(grandchild)) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(child), "the script ({child}) is gone");
    assert!(
        !alive(grandchild),
        "what it started ({grandchild}) is gone too"
    );
    // The worker carries on with the next request.
    std::fs::remove_file(dir.path().join("child")).unwrap();
    let next = c.submit("cancel-me", &2).send().await.unwrap();
    read_pid(&dir.path().join("child")).await;
    c.cancel(next.id()).await.unwrap();
    assert_eq!(wait(&c, next.id()).await.status, Status::Cancelled);
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_scripts_then_exits() {
    let s = server().await;
    let c = client(&s);
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"cat >/dev/null; touch {dir}/started-$COATCHECK_REQUEST_ID; sleep 1.5; echo '"finished"'"#,
        dir = dir.path().display()
    );
    let mut w = WorkerProc::start(&s, "drain", &["--grace", "20"], &script);
    let running = c.submit("drain", &1).send().await.unwrap();
    let marker = dir.path().join(format!("started-{}", running.id()));
    let until = Instant::now() + Duration::from_secs(15);
    while !marker.exists() {
        assert!(Instant::now() < until, "the script started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.signal("-TERM");
    let later = c.submit("drain", &2).send().await.unwrap();
    let code = tokio::task::spawn_blocking(move || {
        let code = w.wait_exit(Duration::from_secs(20));
        (code, w)
    })
    .await
    .unwrap();
    let (code, w) = code;
    assert_eq!(code, Some(0), "exit 0 after draining: {}", w.stderr());
    // The running script was let finish; nothing new was taken.
    let r = c.get(running.id()).await.unwrap();
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.output.unwrap().get(), r#""finished""#);
    assert_eq!(c.get(later.id()).await.unwrap().status, Status::Queued);
    assert!(w.stderr().contains("shutting down"), "{}", w.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_program_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_coatcheck"))
        .args([
            "worker",
            "--queue",
            "q",
            "--server",
            "http://127.0.0.1:9",
            "--",
            "no-such-program-coatcheck",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-program-coatcheck not found"), "{err}");
    // Without a command: a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_coatcheck"))
        .args(["worker", "--queue", "q"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_past_its_grace_kills_the_script_and_hands_the_request_back() {
    let s = server().await;
    let c = client(&s);
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"cat >/dev/null; echo $$ > {dir}/child; sleep 300"#,
        dir = dir.path().display()
    );
    let mut w = WorkerProc::start(&s, "stuck", &["--grace", "0.5"], &script);
    let sub = c.submit("stuck", &1).send().await.unwrap();
    let pid = read_pid(&dir.path().join("child")).await;
    assert!(alive(pid));
    w.signal("-TERM");
    let (code, w) = tokio::task::spawn_blocking(move || (w.wait_exit(Duration::from_secs(20)), w))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{}", w.stderr());
    assert!(
        !alive(pid),
        "the script was killed at the end of the grace period"
    );
    // Handed back: queued again at once, the attempt recorded as a shutdown.
    let r = c.get(sub.id()).await.unwrap();
    assert_eq!(r.status, Status::Queued, "{r:?}");
    let history = c.history(sub.id()).await.unwrap();
    assert!(history.iter().any(|e| matches!(&e.kind,
        EventKind::AttemptFailed { error, .. } if error.code.as_deref() == Some("worker_shutdown"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once_and_kills_the_scripts() {
    let s = server().await;
    let c = client(&s);
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"cat >/dev/null; echo $$ > {dir}/child; sleep 300"#,
        dir = dir.path().display()
    );
    let mut w = WorkerProc::start(&s, "impatient", &["--grace", "60"], &script);
    c.submit("impatient", &1).send().await.unwrap();
    let pid = read_pid(&dir.path().join("child")).await;
    w.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(pid), "the first signal lets it run");
    w.signal("-INT");
    let (code, w) = tokio::task::spawn_blocking(move || (w.wait_exit(Duration::from_secs(10)), w))
        .await
        .unwrap();
    assert_eq!(code, Some(10), "{}", w.stderr());
    let until = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_takes_its_programs_with_it() {
    let s = server().await;
    let c = client(&s);
    let dir = tempfile::tempdir().unwrap();
    // `exec`: the program itself (not a child of the shell) is the one that
    // runs on, as a long job would.
    let script = format!(
        r#"cat >/dev/null; echo $$ > {dir}/child; exec sleep 300"#,
        dir = dir.path().display()
    );
    let mut w = WorkerProc::start(&s, "orphans", &["--lease", "2"], &script);
    let sub = c.submit("orphans", &1).send().await.unwrap();
    let child = read_pid(&dir.path().join("child")).await;
    assert!(alive(child));
    w.signal("-KILL");
    let st = w.child.wait().unwrap();
    assert!(!st.success(), "the worker was killed: {st:?}");
    let until = Instant::now() + Duration::from_secs(10);
    while alive(child) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !alive(child),
        "the program ({child}) died with its worker instead of running on as an orphan"
    );
    // Its request is not lost: the lease runs out and the next worker runs it.
    let _w2 = WorkerProc::start(&s, "orphans", &[], r#"cat >/dev/null; echo '"second"'"#);
    let r = c
        .wait(sub.id(), Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Succeeded, "{r:?}");
    assert_eq!(r.output.as_ref().map(|o| o.get()), Some("\"second\""));
}
