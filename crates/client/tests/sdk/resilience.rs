//! The SDK when the network or the server misbehaves: an answer lost after
//! the server committed the submit, and a server restart in the middle of a
//! run of a worker and its clients.

use std::collections::HashSet;
use std::time::Duration;

use coatcheck_client::{CancellationToken, Client, HandlerError, Job, ListQuery, Status, Worker};
use coatcheck_testkit::TestServer;
use futures::TryStreamExt;
use serde_json::json;

use crate::client;
use crate::proxy::Proxy;

#[tokio::test]
async fn a_submit_whose_answer_was_lost_is_retried_without_a_second_request() {
    let s = TestServer::start().await;
    let proxy = Proxy::start(s.server().addr()).await;
    let c = Client::builder(proxy.url())
        .timeout(Duration::from_secs(10))
        .retries(3)
        .build()
        .unwrap();
    // The server commits the request and answers 202; the client never
    // sees that answer, only its connection closing.
    proxy.lose_next_answer();
    let sub = c
        .submit("once", &json!({"n": 1}))
        .correlation_id("lost-answer")
        .send()
        .await
        .unwrap();
    assert_eq!(proxy.answers_lost(), 1);
    assert!(
        proxy.connections() >= 2,
        "the SDK retried on a new connection"
    );
    // The retry carried the same Idempotency-Key: the server answered with
    // the request it had already made.
    assert!(sub.replayed, "the retry was recognised as the same submit");
    let all: Vec<_> = client(&s)
        .list(ListQuery::new().queue("once"))
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    assert_eq!(all.len(), 1, "exactly one request: {all:?}");
    assert_eq!(all[0].id, sub.request.id);
    assert_eq!(all[0].correlation_id.as_deref(), Some("lost-answer"));

    // With transport retries off, the lost answer is an error — and the
    // request exists anyway (which is why the SDK retries with the key).
    let no_retry = Client::builder(proxy.url()).retries(0).build().unwrap();
    proxy.lose_next_answer();
    let b = no_retry.submit("once", &json!({"n": 2}));
    let key = b.key().to_string();
    let err = b.send().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let again = c
        .submit("once", &json!({"n": 2}))
        .idempotency_key(key)
        .send()
        .await
        .unwrap();
    assert!(again.replayed);
    let n = client(&s)
        .list(ListQuery::new().queue("once"))
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .len();
    assert_eq!(n, 2);
}

#[tokio::test]
async fn a_server_restart_mid_run_loses_nothing() {
    let s = TestServer::start().await;
    // Enough transport retries to ride out the restart (a few seconds).
    let c = Client::builder(s.base_url())
        .timeout(Duration::from_secs(10))
        .retries(10)
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(c.clone(), "restart")
            .concurrency(4)
            .lease(Duration::from_secs(10))
            .poll_wait(Duration::from_secs(2))
            .run_until(
                |job: Job<u64>| async move {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    Ok::<_, HandlerError>(job.input * 10)
                },
                stop.clone(),
            ),
    );
    // A client keeps submitting throughout, through the restart.
    let submitter = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..60u64 {
                let sub = c.submit("restart", &i).send().await.expect("submit");
                ids.push((i, sub.request.id));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = s.restart().await;
    let ids = tokio::time::timeout(Duration::from_secs(60), submitter)
        .await
        .expect("the submitter finishes")
        .unwrap();
    assert_eq!(ids.len(), 60);
    for (i, id) in &ids {
        let out: u64 = c
            .wait_result(id, Some(Duration::from_secs(30)))
            .await
            .unwrap_or_else(|e| panic!("request {i} ({id}): {e}"));
        assert_eq!(out, i * 10);
    }
    let listed: Vec<_> = c
        .list(ListQuery::new().queue("restart"))
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    assert_eq!(listed.len(), 60, "no submit made two requests");
    assert!(listed.iter().all(|r| r.status == Status::Succeeded));
    let unique: HashSet<_> = ids.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(unique.len(), 60);
    stop.cancel();
    worker.await.unwrap().unwrap();
    drop(s);
}
