use std::time::Duration;

use coatcheck_client::wire::{ClaimBody, FailBody, SettlementItem};
use coatcheck_client::{CancelOutcome, Error, ErrorInfo, EventKind, ListQuery, ReplyTo, Status};
use coatcheck_testkit::TestServer;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::client;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Thumb {
    url: String,
    width: u32,
}

fn claim_body(max: u32) -> ClaimBody {
    ClaimBody {
        worker_id: "test".into(),
        max: Some(max),
        lease: Some(30.0),
        wait: Some(5.0),
    }
}

#[tokio::test]
async fn submit_claim_complete_and_read_the_typed_result() {
    let s = TestServer::start().await;
    let c = client(&s);
    let input = Thumb {
        url: "https://x/cat.png".into(),
        width: 128,
    };
    let sub = c
        .submit("thumbs", &input)
        .correlation_id("order-42")
        .priority(3)
        .max_attempts(5)
        .metadata("tenant", "acme")
        .reply_to(ReplyTo::Channel("replies".into()))
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .unwrap();
    assert!(!sub.replayed && !sub.terminal);
    let req = &sub.request;
    assert_eq!(req.status, Status::Queued);
    assert_eq!(req.correlation_id.as_deref(), Some("order-42"));
    assert_eq!(req.priority, 3);
    assert_eq!(req.max_attempts, 5);
    assert_eq!(req.metadata.get("tenant").map(String::as_str), Some("acme"));
    assert!(req.deadline.is_some());
    assert!(matches!(
        c.result::<Thumb>(sub.id()).await,
        Err(Error::NotReady)
    ));

    let claimed = c.claim("thumbs", claim_body(10)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let job = &claimed[0];
    assert_eq!(job.id, sub.id());
    assert_eq!(job.correlation_id.as_deref(), Some("order-42"));
    let hb = c
        .heartbeat(
            &job.id,
            coatcheck_client::wire::HeartbeatBody {
                lease_token: job.lease_token.clone(),
                progress: Some(serde_json::value::to_raw_value(&json!({"pct": 50})).unwrap()),
                extend: None,
            },
        )
        .await
        .unwrap();
    assert!(!hb.cancel_requested);
    let out = Thumb {
        url: "https://x/cat-128.png".into(),
        width: 128,
    };
    let done = c.complete(&job.id, &job.lease_token, &out).await.unwrap();
    assert_eq!(done.status, Status::Succeeded);
    // Completing twice with the current token is idempotent.
    c.complete(&job.id, &job.lease_token, &out).await.unwrap();

    let got: Thumb = c
        .wait_result(sub.id(), Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(got, out);
    let history = c.history(sub.id()).await.unwrap();
    let kinds: Vec<_> = history.iter().map(|e| e.kind.name()).collect();
    // (then `reply_delivered` for the channel, possibly not yet)
    assert_eq!(
        kinds[..4],
        ["submitted", "claimed", "progress", "succeeded"]
    );
    assert!(matches!(
        history[1].kind,
        EventKind::Claimed { attempt: 1, .. }
    ));
}

#[tokio::test]
async fn a_resubmit_with_the_same_key_is_a_replay() {
    let s = TestServer::start().await;
    let c = client(&s);
    let first = c.submit("q", &json!({"n": 1})).send().await.unwrap();
    let again = c
        .submit("q", &json!({"n": 1}))
        .idempotency_key(first.idempotency_key.clone())
        .send()
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.id(), first.id());
    // Same key, different body: 422.
    let err = c
        .submit("q", &json!({"n": 2}))
        .idempotency_key(first.idempotency_key.clone())
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(422), "{err}");
    // Generated keys differ: two submits are two requests.
    let other = c.submit("q", &json!({"n": 1})).send().await.unwrap();
    assert_ne!(other.id(), first.id());
}

#[tokio::test]
async fn failures_cancels_and_redrives() {
    let s = TestServer::start().await;
    let c = client(&s);
    let a = c.submit("q", &1).max_attempts(1).send().await.unwrap();
    let job = c.claim("q", claim_body(1)).await.unwrap().remove(0);
    let failed = c
        .fail(
            &job.id,
            FailBody {
                lease_token: job.lease_token.clone(),
                error: ErrorInfo::new("boom", "it broke"),
                retryable: Some(false),
                retry_after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(failed.status, Status::Failed);
    let err = c.result::<serde_json::Value>(a.id()).await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(err.request_status(), Some(Status::Failed));
    assert_eq!(err.request_error().unwrap().code.as_deref(), Some("boom"));
    // A stale token is fenced.
    let err = c.complete(&job.id, &job.lease_token, &1).await.unwrap_err();
    assert!(err.is_conflict(), "{err}");

    let redriven = c.redrive(a.id()).await.unwrap();
    assert_eq!(redriven.status, Status::Queued);
    match c.cancel(a.id()).await.unwrap() {
        CancelOutcome::Cancelled(r) => assert_eq!(r.status, Status::Cancelled),
        other => panic!("{other:?}"),
    }
    assert!(c.cancel(a.id()).await.unwrap_err().is_conflict());

    // Running: the cancel is a request the worker learns by heartbeat.
    let b = c.submit("q", &2).send().await.unwrap();
    let job = c.claim("q", claim_body(1)).await.unwrap().remove(0);
    assert!(matches!(
        c.cancel(b.id()).await.unwrap(),
        CancelOutcome::Requested
    ));
    let hb = c
        .heartbeat(
            &job.id,
            coatcheck_client::wire::HeartbeatBody {
                lease_token: job.lease_token.clone(),
                progress: None,
                extend: None,
            },
        )
        .await
        .unwrap();
    assert!(hb.cancel_requested);
}

#[tokio::test]
async fn unknown_and_odd_ids_are_not_found() {
    let s = TestServer::start().await;
    let c = client(&s);
    for id in [
        "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77",
        "a/b",
        "x?y#z",
        "%2e%2e",
        "ä",
    ] {
        let err = c.get(id).await.unwrap_err();
        assert!(err.is_not_found(), "{id}: {err}");
        assert!(err.problem().is_some());
    }
    assert!(matches!(c.get("..").await, Err(Error::Invalid(_))));
}

#[tokio::test]
async fn wait_times_out_and_long_polls_to_the_end() {
    let s = TestServer::start().await;
    let c = client(&s);
    let sub = c.submit("q", &1).send().await.unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(
        c.wait(sub.id(), Some(Duration::from_millis(400))).await,
        Err(Error::Timeout)
    ));
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(started.elapsed() < Duration::from_secs(3));

    let waiter = {
        let c = c.clone();
        let id = sub.id().to_string();
        tokio::spawn(async move { c.wait(&id, Some(Duration::from_secs(20))).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let job = c.claim("q", claim_body(1)).await.unwrap().remove(0);
    c.complete(&job.id, &job.lease_token, &"done")
        .await
        .unwrap();
    let done = waiter.await.unwrap().unwrap();
    assert_eq!(done.status, Status::Succeeded);
}

#[tokio::test]
async fn prefer_wait_returns_the_terminal_request() {
    let s = TestServer::start().await;
    let c = client(&s);
    let worker = {
        let c = c.clone();
        tokio::spawn(async move {
            let job = c.claim("fast", claim_body(1)).await.unwrap().remove(0);
            c.complete(&job.id, &job.lease_token, &"quick")
                .await
                .unwrap();
        })
    };
    let sub = c
        .submit("fast", &1)
        .prefer_wait(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    worker.await.unwrap();
    assert!(sub.terminal, "{:?}", sub.request.status);
    assert_eq!(sub.request.status, Status::Succeeded);
    assert_eq!(sub.request.output.as_ref().unwrap().get(), r#""quick""#);
}

#[tokio::test]
async fn list_streams_every_page() {
    let s = TestServer::start().await;
    let c = client(&s);
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            c.submit("listed", &i)
                .correlation_id("batch")
                .send()
                .await
                .unwrap()
                .request
                .id,
        );
    }
    c.submit("other", &0).send().await.unwrap();
    let listed: Vec<_> = c
        .list(ListQuery::new().queue("listed").limit(2))
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let mut got: Vec<_> = listed.iter().map(|r| r.id.clone()).collect();
    // Newest first.
    ids.reverse();
    assert_eq!(got, ids);
    got = c
        .list(
            ListQuery::new()
                .correlation_id("batch")
                .status(Status::Queued)
                .limit(3),
        )
        .map_ok(|r| r.id)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(got.len(), 7);
    let page = c.list_page(&ListQuery::new().limit(1), None).await.unwrap();
    assert_eq!(page.requests.len(), 1);
    assert!(page.next_page_token.is_some());
    let err = c
        .list(ListQuery::new().limit(0))
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
}

#[tokio::test]
async fn settle_completes_and_fails_in_one_call() {
    let s = TestServer::start().await;
    let c = client(&s);
    let a = c.submit("batch", &1).send().await.unwrap();
    let b = c.submit("batch", &2).send().await.unwrap();
    let claimed = c.claim("batch", claim_body(2)).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let items = claimed
        .iter()
        .map(|j| {
            if j.id == a.request.id {
                SettlementItem {
                    id: j.id.clone(),
                    lease_token: j.lease_token.clone(),
                    output: Some(serde_json::value::to_raw_value(&"ok").unwrap()),
                    error: None,
                    retryable: None,
                    retry_after: None,
                }
            } else {
                SettlementItem {
                    id: j.id.clone(),
                    lease_token: "stale".into(),
                    output: None,
                    error: Some(ErrorInfo::new("x", "y")),
                    retryable: Some(true),
                    retry_after: None,
                }
            }
        })
        .collect();
    let results = c.settle("batch", items).await.unwrap();
    for r in results {
        if r.id == a.request.id {
            assert_eq!(r.status, 200);
            assert_eq!(r.request.map(|q| q.status), Some(Status::Succeeded));
            assert_eq!(r.request_status, Some(Status::Succeeded));
        } else {
            assert_eq!(r.id, b.request.id);
            assert_eq!(r.status, 409);
        }
    }
}

#[tokio::test]
async fn settle_minimal_answers_the_status_without_the_request() {
    let s = TestServer::start().await;
    let c = client(&s);
    c.submit("slim", &1).send().await.unwrap();
    let job = c.claim("slim", claim_body(1)).await.unwrap().remove(0);
    let item = SettlementItem {
        id: job.id.clone(),
        lease_token: job.lease_token.clone(),
        output: Some(serde_json::value::to_raw_value(&"x".repeat(10_000)).unwrap()),
        error: None,
        retryable: None,
        retry_after: None,
    };
    let r = c
        .settle_minimal("slim", vec![item])
        .await
        .unwrap()
        .remove(0);
    assert_eq!((r.id.as_str(), r.status), (job.id.as_str(), 200));
    assert!(r.request.is_none(), "the output is not sent back");
    assert_eq!(r.request_status, Some(Status::Succeeded));
    assert_eq!(c.get(&job.id).await.unwrap().status, Status::Succeeded);
}

#[tokio::test]
async fn queues_are_listed() {
    let s = TestServer::start().await;
    let c = client(&s);
    c.submit("counted", &1).send().await.unwrap();
    let q = c.queues().await.unwrap();
    let info = q.queues.iter().find(|q| q.name == "counted").unwrap();
    assert_eq!(info.counts.get(&Status::Queued), Some(&1));
}

#[tokio::test]
async fn an_unreachable_server_is_a_transport_error_after_retries() {
    let c = coatcheck_client::Client::builder("http://127.0.0.1:9")
        .retries(2)
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let err = c.submit("q", &1).send().await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err}");
    assert!(err.is_transient());
    // Two backoffs happened (≥ 50 ms + 100 ms).
    assert!(started.elapsed() >= Duration::from_millis(150));
}
