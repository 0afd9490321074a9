//! Reply channels through the SDK: the consumer stream with ack, redelivery
//! of what was not acked (same message id), replies for every outcome, and
//! the raw receive/ack calls.

use std::collections::HashMap;
use std::time::Duration;

use coatcheck_client::wire::{ClaimBody, FailBody};
use coatcheck_client::{Client, Delivery, ErrorInfo, ReplyTo, Status};
use coatcheck_testkit::TestServer;
use futures::StreamExt;
use serde_json::json;

use crate::client;

async fn next(d: &mut coatcheck_client::Deliveries) -> Delivery {
    tokio::time::timeout(Duration::from_secs(15), d.next())
        .await
        .expect("a message within 15 s")
        .expect("the stream goes on")
        .expect("no error")
}

/// Submits three requests replying to `channel` and settles them:
/// succeeded, failed, cancelled. Returns their ids in that order.
async fn three_outcomes(c: &Client, channel: &str) -> [String; 3] {
    let mut ids = Vec::new();
    for (i, corr) in ["ok", "bad", "stop"].into_iter().enumerate() {
        let sub = c
            .submit("chq", &json!({"i": i}))
            .correlation_id(corr)
            .max_attempts(1)
            .reply_to(ReplyTo::Channel(channel.into()))
            .send()
            .await
            .unwrap();
        ids.push(sub.request.id);
    }
    c.cancel(&ids[2]).await.unwrap();
    let claimed = c
        .claim(
            "chq",
            ClaimBody {
                worker_id: "w".into(),
                max: Some(2),
                lease: Some(30.0),
                wait: Some(5.0),
            },
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    for job in claimed {
        if job.id == ids[0] {
            c.complete(&job.id, &job.lease_token, &json!({"thumb": "x.png"}))
                .await
                .unwrap();
        } else {
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
        }
    }
    [ids[0].clone(), ids[1].clone(), ids[2].clone()]
}

#[tokio::test]
async fn the_consumer_gets_every_reply_and_what_is_not_acked_comes_back() {
    let s = TestServer::start().await;
    let c = client(&s);
    let ids = three_outcomes(&c, "inbox").await;
    let channel = c
        .channel("inbox")
        .visibility(Duration::from_millis(1500))
        .wait(Duration::from_secs(5));
    let mut replies = channel.messages();
    let mut by_request: HashMap<String, Delivery> = HashMap::new();
    for _ in 0..3 {
        let d = next(&mut replies).await;
        assert_eq!(d.delivery_count, 1);
        assert_eq!(d.channel(), "inbox");
        by_request.insert(d.message.request_id.clone(), d);
    }
    let ok = &by_request[&ids[0]];
    assert_eq!(ok.message.status, Status::Succeeded);
    assert_eq!(ok.message.correlation_id.as_deref(), Some("ok"));
    assert_eq!(ok.message.queue, "chq");
    assert!(ok.message.finished_at.is_some());
    let out: serde_json::Value = ok.output().unwrap();
    assert_eq!(out, json!({"thumb": "x.png"}));
    let bad = &by_request[&ids[1]];
    assert_eq!(bad.message.status, Status::Failed);
    assert_eq!(
        bad.message.error.as_ref().unwrap().code.as_deref(),
        Some("boom")
    );
    assert!(bad.output::<serde_json::Value>().is_err());
    let stop = &by_request[&ids[2]];
    assert_eq!(stop.message.status, Status::Cancelled);

    // Ack two; the third is left to run out of visibility.
    assert!(ok.ack().await.unwrap());
    assert!(bad.ack().await.unwrap());
    // A second ack of the same token finds nothing: no harm.
    assert!(!ok.ack().await.unwrap());

    let again = next(&mut replies).await;
    assert_eq!(again.message.message_id, stop.message.message_id);
    assert_eq!(again.message.request_id, ids[2]);
    assert_eq!(again.delivery_count, 2);
    assert_ne!(again.ack_token, stop.ack_token);
    // The old token no longer holds it; the new one does.
    assert!(!stop.ack().await.unwrap());
    assert!(again.ack().await.unwrap());

    // Nothing else is left.
    let empty = c
        .channel_receive(
            "inbox",
            10,
            Duration::from_secs(30),
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    assert!(empty.is_empty(), "{empty:?}");
}

#[tokio::test]
async fn raw_receive_and_batch_ack() {
    let s = TestServer::start().await;
    let c = client(&s);
    let ids = three_outcomes(&c, "raw").await;
    let mut got = Vec::new();
    while got.len() < 3 {
        let batch = c
            .channel_receive("raw", 2, Duration::from_secs(30), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(batch.len() <= 2);
        got.extend(batch);
    }
    let mut seen: Vec<_> = got.iter().map(|m| m.message.request_id.clone()).collect();
    seen.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(seen, want);
    let tokens: Vec<String> = got.iter().map(|m| m.ack_token.clone()).collect();
    let answer = c
        .channel_ack(
            "raw",
            [tokens.clone(), vec!["no-such-token".into()]].concat(),
        )
        .await
        .unwrap();
    assert_eq!(answer.acked, tokens);
    assert_eq!(answer.not_found, vec!["no-such-token".to_string()]);
    // A long-poll on an empty channel waits, then answers empty.
    let started = std::time::Instant::now();
    let none = c
        .channel_receive("raw", 1, Duration::from_secs(1), Duration::from_millis(500))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(400));
    // Bad arguments are the server's 400 or refused before sending.
    let err = c
        .channel_receive("bad name", 1, Duration::from_secs(1), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, coatcheck_client::Error::Invalid(_)), "{err}");
}

#[tokio::test]
async fn ack_all_and_a_waiting_consumer() {
    let s = TestServer::start().await;
    let c = client(&s);
    let channel = c.channel("later").max(5).wait(Duration::from_secs(5));
    // The consumer is already waiting when the replies are made.
    let consumer = {
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut replies = channel.messages();
            let mut got = Vec::new();
            while got.len() < 3 {
                got.push(next(&mut replies).await);
            }
            got
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    three_outcomes(&c, "later").await;
    let got = tokio::time::timeout(Duration::from_secs(20), consumer)
        .await
        .unwrap()
        .unwrap();
    let answer = channel.ack_all(&got).await.unwrap();
    assert_eq!(answer.acked.len(), 3);
    let left = c
        .channel("later")
        .wait(Duration::from_millis(200))
        .receive()
        .await
        .unwrap();
    assert!(left.is_empty());
}

#[tokio::test]
async fn acking_a_reply_or_seeing_the_end_on_the_stream_clears_the_journal() {
    use futures::TryStreamExt;
    let s = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let c = client(&s).with_journal(dir.path().join("pending")).unwrap();
    let by_channel = c
        .submit("jq", &1)
        .reply_to(ReplyTo::Channel("journaled".into()))
        .send()
        .await
        .unwrap();
    let by_events = c.submit("jq", &2).send().await.unwrap();
    assert_eq!(c.pending().unwrap().len(), 2);
    for job in c
        .claim(
            "jq",
            ClaimBody {
                worker_id: "w".into(),
                max: Some(2),
                lease: None,
                wait: Some(5.0),
            },
        )
        .await
        .unwrap()
    {
        c.complete(&job.id, &job.lease_token, &"ok").await.unwrap();
    }
    let mut replies = c
        .channel("journaled")
        .wait(Duration::from_secs(5))
        .messages();
    let reply = next(&mut replies).await;
    assert_eq!(reply.message.request_id, by_channel.request.id);
    assert!(reply.ack().await.unwrap());
    let left: Vec<_> = c
        .pending()
        .unwrap()
        .into_iter()
        .filter_map(|p| p.id)
        .collect();
    assert_eq!(left, vec![by_events.request.id.clone()]);
    let events: Vec<_> = c.events(by_events.id()).try_collect().await.unwrap();
    assert!(events.last().unwrap().is_terminal());
    assert!(c.pending().unwrap().is_empty());
}

/// `Channel::events`: the replies pushed over SSE, each acked; what is not
/// acked is pushed again with the same message id once its visibility runs
/// out.
#[tokio::test]
async fn pushed_replies_are_acked_and_what_is_not_comes_back() {
    let s = TestServer::start().await;
    let c = client(&s);
    let ids = three_outcomes(&c, "pushed").await;
    let mut replies = c
        .channel("pushed")
        .visibility(Duration::from_millis(1500))
        .events();
    let mut by_request: HashMap<String, Delivery> = HashMap::new();
    for _ in 0..3 {
        let d = next(&mut replies).await;
        assert_eq!(d.delivery_count, 1);
        assert_eq!(d.channel(), "pushed");
        by_request.insert(d.message.request_id.clone(), d);
    }
    assert_eq!(by_request[&ids[0]].message.status, Status::Succeeded);
    assert_eq!(by_request[&ids[1]].message.status, Status::Failed);
    assert_eq!(by_request[&ids[2]].message.status, Status::Cancelled);
    assert!(by_request[&ids[0]].ack().await.unwrap());
    assert!(by_request[&ids[1]].ack().await.unwrap());

    let again = next(&mut replies).await;
    assert_eq!(
        again.message.message_id,
        by_request[&ids[2]].message.message_id
    );
    assert_eq!(again.delivery_count, 2);
    assert!(again.ack().await.unwrap());
    drop(replies);
    let left = c
        .channel("pushed")
        .wait(Duration::from_millis(200))
        .receive()
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// `Channel::events_auto_acked`: the server removes each message as it
/// writes it, so nothing comes back after the visibility (it would without
/// the auto-ack), and the journal counts the reply as consumed.
#[tokio::test]
async fn auto_acked_replies_do_not_come_back() {
    let s = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let c = client(&s).with_journal(dir.path().join("pending")).unwrap();
    let ids = three_outcomes(&c, "auto").await;
    assert!(!c.pending().unwrap().is_empty());
    let visibility = Duration::from_millis(500);
    let mut replies = c.channel("auto").visibility(visibility).events_auto_acked();
    let mut got: Vec<String> = Vec::new();
    for _ in 0..3 {
        got.push(next(&mut replies).await.message.request_id);
    }
    got.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(got, want);
    assert!(c.pending().unwrap().is_empty(), "consumed");
    drop(replies);
    tokio::time::sleep(visibility * 3).await;
    let left = c
        .channel("auto")
        .visibility(visibility)
        .wait(Duration::from_millis(200))
        .receive()
        .await
        .unwrap();
    assert!(left.is_empty(), "acked by the server: {left:?}");
}

/// A pushed stream whose connection is cut is reopened by itself, and the
/// replies that come later still arrive.
#[tokio::test]
async fn a_cut_push_stream_is_reopened() {
    let s = TestServer::start().await;
    let proxy = crate::proxy::Proxy::start(s.server().addr()).await;
    let direct = client(&s);
    let via_proxy = Client::builder(proxy.url())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut replies = via_proxy.channel("cut").events();
    for round in 0..3 {
        let sub = direct
            .submit("cutq", &json!({"round": round}))
            .reply_to(ReplyTo::Channel("cut".into()))
            .send()
            .await
            .unwrap();
        let job = crate::claim_one(&direct, "cutq").await;
        direct
            .complete(&job.id, &job.lease_token, &round)
            .await
            .unwrap();
        let d = next(&mut replies).await;
        assert_eq!(d.message.request_id, sub.request.id);
        assert_eq!(d.output::<i32>().unwrap(), round);
        assert!(d.ack().await.unwrap());
        proxy.cut_all();
    }
    assert!(proxy.connections() >= 3, "{}", proxy.connections());
}

/// A request that succeeded with a `null` output (a handler with nothing
/// to return) has a reply whose output reads as `()` or `None`.
#[tokio::test]
async fn a_null_output_reads_as_nothing() {
    let s = TestServer::start().await;
    let c = client(&s);
    c.submit("voidq", &1)
        .reply_to(ReplyTo::Channel("void".into()))
        .send()
        .await
        .unwrap();
    let job = crate::claim_one(&c, "voidq").await;
    c.complete(&job.id, &job.lease_token, &()).await.unwrap();
    let mut replies = c.channel("void").wait(Duration::from_secs(5)).messages();
    let d = next(&mut replies).await;
    assert_eq!(d.message.status, Status::Succeeded);
    d.output::<()>().unwrap();
    assert_eq!(d.output::<Option<i32>>().unwrap(), None);
    assert!(d.output::<i32>().is_err(), "null is not a number");
}
