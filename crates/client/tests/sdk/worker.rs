use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coatcheck_client::{
    CancellationToken, Client, Error, EventKind, HandlerError, Job, Status, Worker, WorkerEvent,
};
use coatcheck_testkit::TestServer;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::{client, eventually};

#[derive(Debug, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

/// Runs `worker` with `handler` in the background; cancel the token to stop it.
fn spawn<T, O, H, Fut>(
    worker: Worker,
    handler: H,
) -> (JoinHandle<Result<(), Error>>, CancellationToken)
where
    T: serde::de::DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    H: Fn(Job<T>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<O, HandlerError>> + Send + 'static,
{
    let token = CancellationToken::new();
    let run = worker.run_until(handler, token.clone());
    (tokio::spawn(run), token)
}

fn recorder() -> (
    Arc<Mutex<Vec<String>>>,
    impl Fn(&WorkerEvent) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (seen, move |e: &WorkerEvent| {
        s.lock().unwrap().push(format!("{e:?}"))
    })
}

#[tokio::test]
async fn a_typed_worker_processes_many_concurrently() {
    let s = TestServer::start().await;
    let c = client(&s);
    let (events, on_event) = recorder();
    let (run, stop) = spawn(
        Worker::new(c.clone(), "add")
            .concurrency(8)
            .on_event(on_event),
        |job: Job<Add>| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, HandlerError>(job.input.a + job.input.b)
        },
    );
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            c.submit("add", &Add { a: i, b: 1 })
                .send()
                .await
                .unwrap()
                .request
                .id,
        );
    }
    for (i, id) in ids.iter().enumerate() {
        let sum: i64 = c
            .wait_result(id, Some(Duration::from_secs(20)))
            .await
            .unwrap();
        assert_eq!(sum, i as i64 + 1);
    }
    stop.cancel();
    run.await.unwrap().unwrap();
    let events = events.lock().unwrap();
    assert_eq!(
        events.iter().filter(|e| e.starts_with("Settled")).count(),
        40,
        "{events:?}"
    );
    // Batched or single, each outcome says where its request went (batches
    // ask for `return=minimal`, so the status comes without the request).
    assert!(
        events
            .iter()
            .filter(|e| e.starts_with("Settled"))
            .all(|e| e.ends_with("status: Some(Succeeded) }")),
        "{events:?}"
    );
}

#[tokio::test]
async fn raw_json_works_as_input_and_output() {
    let s = TestServer::start().await;
    let c = client(&s);
    let (run, stop) = spawn(
        Worker::new(c.clone(), "raw"),
        |job: Job<serde_json::Value>| async move {
            Ok::<_, HandlerError>(json!({"echo": job.input, "attempt": job.attempt()}))
        },
    );
    let sub = c
        .submit("raw", &json!([1, "two", null]))
        .send()
        .await
        .unwrap();
    let out: serde_json::Value = c
        .wait_result(sub.id(), Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(out, json!({"echo": [1, "two", null], "attempt": 1}));
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// A handler with nothing to return (`()`: JSON `null`) completes its
/// requests with a `null` output (the worker batches its settlements, whose
/// items take `null` as an output as the single complete does).
#[tokio::test]
async fn a_handler_that_returns_nothing_completes_its_requests() {
    let s = TestServer::start().await;
    let c = client(&s);
    let (run, stop) = spawn(
        Worker::new(c.clone(), "void").concurrency(4),
        |_job: Job<serde_json::Value>| async move { Ok::<_, HandlerError>(()) },
    );
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(c.submit("void", &i).send().await.unwrap().request.id);
    }
    for id in &ids {
        let done = c.wait(id, Some(Duration::from_secs(10))).await.unwrap();
        assert_eq!(done.status, Status::Succeeded, "{:?}", done.error);
        assert!(
            done.output.as_ref().is_none_or(|o| o.get() == "null"),
            "{:?}",
            done.output
        );
    }
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn leases_are_renewed_while_a_handler_outlives_three_of_them() {
    let s = TestServer::start().await;
    let c = client(&s);
    let (run, stop) = spawn(
        Worker::new(c.clone(), "slow").lease(Duration::from_secs(1)),
        |job: Job<u32>| async move {
            // 4 s: more than three 1 s leases.
            for i in 0..8 {
                job.progress(json!({"step": i}));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok::<_, HandlerError>(job.input * 2)
        },
    );
    let sub = c.submit("slow", &21).send().await.unwrap();
    // Progress is visible while it runs.
    let saw_progress = eventually(Duration::from_secs(5), || {
        let c = c.clone();
        let id = sub.request.id.clone();
        async move { c.get(&id).await.unwrap().progress.is_some() }
    })
    .await;
    assert!(saw_progress);
    let done = c
        .wait(sub.id(), Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(done.status, Status::Succeeded);
    assert_eq!(done.attempts, 1, "the lease never ran out");
    assert_eq!(done.output.unwrap().get(), "42");
    let history = c.history(sub.id()).await.unwrap();
    assert!(!history
        .iter()
        .any(|e| matches!(e.kind, EventKind::LeaseExpired { .. })));
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_cancel_reaches_the_running_handler() {
    let s = TestServer::start().await;
    let c = client(&s);
    let started = Arc::new(tokio::sync::Notify::new());
    let started2 = started.clone();
    let (run, stop) = spawn(
        Worker::new(c.clone(), "cancel").lease(Duration::from_secs(1)),
        move |job: Job<u32>| {
            let started = started2.clone();
            async move {
                started.notify_one();
                job.cancelled().cancelled().await;
                Err::<u32, _>(HandlerError::retryable("stopped on request").code("cancelled"))
            }
        },
    );
    let sub = c.submit("cancel", &1).send().await.unwrap();
    started.notified().await;
    c.cancel(sub.id()).await.unwrap();
    let done = c
        .wait(sub.id(), Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(done.status, Status::Cancelled);
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_panic_is_a_failed_attempt_not_a_dead_worker() {
    let s = TestServer::start().await;
    let c = client(&s);
    let (events, on_event) = recorder();
    let (run, stop) = spawn(
        Worker::new(c.clone(), "panicky").on_event(on_event),
        |job: Job<u32>| async move {
            if job.attempt() == 1 {
                panic!("first attempt explodes");
            }
            Ok::<_, HandlerError>(job.input)
        },
    );
    let sub = c.submit("panicky", &5).send().await.unwrap();
    let done = c
        .wait(sub.id(), Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(done.status, Status::Succeeded);
    assert_eq!(done.attempts, 2);
    let history = c.history(sub.id()).await.unwrap();
    let failed = history
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::AttemptFailed { error, .. } => Some(error.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(failed.code.as_deref(), Some("panic"));
    assert!(failed.message.contains("first attempt explodes"));
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .any(|e| e.starts_with("Panicked")));
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn fatal_retryable_and_bad_input() {
    let s = TestServer::start().await;
    let c = client(&s);
    let (run, stop) = spawn(
        Worker::new(c.clone(), "errs").concurrency(3),
        |job: Job<Add>| async move {
            match job.input.a {
                0 => Err(HandlerError::fatal("no zeroes").code("zero")),
                1 if job.attempt() == 1 => {
                    Err(HandlerError::retryable("later").retry_after(Duration::from_millis(200)))
                }
                _ => Ok(job.input.a),
            }
        },
    );
    let fatal = c.submit("errs", &Add { a: 0, b: 0 }).send().await.unwrap();
    let retry = c.submit("errs", &Add { a: 1, b: 0 }).send().await.unwrap();
    let bad = c
        .submit("errs", &json!({"not": "an Add"}))
        .send()
        .await
        .unwrap();

    let r = c
        .wait(fatal.id(), Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.attempts, 1);
    assert_eq!(r.error.unwrap().code.as_deref(), Some("zero"));

    let r = c
        .wait(retry.id(), Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.attempts, 2);

    let r = c
        .wait(bad.id(), Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.error.unwrap().code.as_deref(), Some("invalid_input"));
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_lets_work_finish_then_releases_the_rest() {
    let s = TestServer::start().await;
    let c = client(&s);
    let running = Arc::new(AtomicUsize::new(0));
    let r2 = running.clone();
    let (run, stop) = spawn(
        Worker::new(c.clone(), "drain")
            .concurrency(2)
            .grace_period(Duration::from_millis(500)),
        move |job: Job<u64>| {
            let running = r2.clone();
            async move {
                running.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(job.input)).await;
                Ok::<_, HandlerError>(job.input)
            }
        },
    );
    let quick = c.submit("drain", &100u64).send().await.unwrap();
    let stuck = c.submit("drain", &600_000u64).send().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            let n = running.load(Ordering::SeqCst);
            async move { n == 2 }
        })
        .await
    );
    let started = std::time::Instant::now();
    stop.cancel();
    run.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The quick one finished within the grace period.
    assert_eq!(c.get(quick.id()).await.unwrap().status, Status::Succeeded);
    // The stuck one was failed retryable and is claimable again at once.
    let r = c.get(stuck.id()).await.unwrap();
    assert_eq!(r.status, Status::Queued);
    let history = c.history(stuck.id()).await.unwrap();
    assert!(history.iter().any(|e| matches!(&e.kind,
        EventKind::AttemptFailed { error, .. } if error.code.as_deref() == Some("worker_shutdown"))));
    let again = c
        .claim(
            "drain",
            coatcheck_client::wire::ClaimBody {
                worker_id: "next".into(),
                max: Some(1),
                lease: None,
                wait: Some(2.0),
            },
        )
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, stuck.request.id);
}

#[tokio::test]
async fn run_stops_when_its_shutdown_future_completes() {
    let s = TestServer::start().await;
    let c: Client = client(&s);
    let started = std::time::Instant::now();
    Worker::new(c, "idle")
        .run(
            |job: Job<serde_json::Value>| async move { Ok::<_, HandlerError>(job.input) },
            tokio::time::sleep(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    // The idle long-poll claim was dropped, not waited out.
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_refused_claim_stops_the_worker_with_its_error() {
    let s = TestServer::start().await;
    let c = client(&s);
    // A lease above the ten-year limit is a 400.
    let err = Worker::new(c, "q")
        .lease(Duration::from_secs(400_000_000))
        .run_until(
            |job: Job<serde_json::Value>| async move { Ok::<_, HandlerError>(job.input) },
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
}

#[tokio::test]
async fn an_output_the_server_refuses_fails_the_request() {
    let s = TestServer::start().await;
    let c = client(&s);
    let (run, stop) = spawn(
        Worker::new(c.clone(), "huge"),
        |_job: Job<u32>| async move { Ok::<_, HandlerError>("x".repeat(2 * 1024 * 1024)) },
    );
    let sub = c.submit("huge", &1).send().await.unwrap();
    let r = c
        .wait(sub.id(), Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.attempts, 1);
    assert_eq!(r.error.unwrap().code.as_deref(), Some("output_rejected"));
    stop.cancel();
    run.await.unwrap().unwrap();
}
