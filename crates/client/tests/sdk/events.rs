//! `Client::events`: a request's Server-Sent Events as a stream, to its end,
//! resumed after a given event, after a cut connection and across a server
//! restart — never missing or repeating an event.

use std::time::Duration;

use coatcheck_client::wire::{ClaimedRequest, HeartbeatBody};
use coatcheck_client::{Client, RequestEvent, RequestEventKind, Status};
use coatcheck_testkit::TestServer;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use crate::proxy::Proxy;
use crate::{claim_one as claim, client};

async fn progress(c: &Client, job: &ClaimedRequest, value: serde_json::Value) {
    c.heartbeat(
        &job.id,
        HeartbeatBody {
            lease_token: job.lease_token.clone(),
            progress: Some(serde_json::value::to_raw_value(&value).unwrap()),
            extend: None,
        },
    )
    .await
    .unwrap();
}

/// The next event within a few seconds.
async fn next(events: &mut coatcheck_client::RequestEvents) -> RequestEvent {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream goes on")
        .expect("no error")
}

fn summary(events: &[RequestEvent]) -> Vec<(RequestEventKind, Status)> {
    events.iter().map(|e| (e.kind, e.request.status)).collect()
}

#[tokio::test]
async fn a_stream_follows_a_request_to_its_end() {
    let s = TestServer::start().await;
    let c = client(&s);
    let sub = c.submit("ev", &json!({"n": 1})).send().await.unwrap();
    let mut events = c.events(sub.id());
    let first = next(&mut events).await;
    assert_eq!(first.kind, RequestEventKind::Status);
    assert_eq!(first.request.status, Status::Queued);
    assert_eq!(first.request.id, sub.request.id);

    let job = claim(&c, "ev").await;
    progress(&c, &job, json!({"pct": 50})).await;
    c.complete(&job.id, &job.lease_token, &json!("done"))
        .await
        .unwrap();

    let rest: Vec<RequestEvent> =
        tokio::time::timeout(Duration::from_secs(10), events.try_collect::<Vec<_>>())
            .await
            .expect("the stream ends after the terminal event")
            .unwrap();
    assert_eq!(
        summary(&rest),
        [
            (RequestEventKind::Status, Status::Running),
            (RequestEventKind::Progress, Status::Running),
            (RequestEventKind::Status, Status::Succeeded),
        ]
    );
    assert_eq!(
        rest[1].request.progress.as_ref().unwrap().get(),
        r#"{"pct":50}"#
    );
    assert_eq!(rest[2].request.output.as_ref().unwrap().get(), r#""done""#);
    let mut seqs = vec![first.seq];
    seqs.extend(rest.iter().map(|e| e.seq));
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(rest[2].is_terminal());

    // A terminal request's stream is its state, then the end.
    let again: Vec<_> = c.events(sub.id()).try_collect().await.unwrap();
    assert_eq!(
        summary(&again),
        [(RequestEventKind::Status, Status::Succeeded)]
    );
    // Resumed past the terminal event (204): nothing at all.
    let past: Vec<_> = c
        .events_after(sub.id(), rest[2].seq)
        .try_collect()
        .await
        .unwrap();
    assert!(past.is_empty());
}

#[tokio::test]
async fn events_after_replays_exactly_what_followed() {
    let s = TestServer::start().await;
    let c = client(&s);
    let sub = c.submit("ev", &1).send().await.unwrap();
    let job = claim(&c, "ev").await;
    // A consumer reads up to here and stops.
    let seen = {
        let mut events = c.events(sub.id());
        next(&mut events).await
    };
    assert_eq!(seen.request.status, Status::Running);
    // Meanwhile: two progress reports and the end.
    progress(&c, &job, json!(1)).await;
    progress(&c, &job, json!(2)).await;
    c.complete(&job.id, &job.lease_token, &3).await.unwrap();

    let missed: Vec<_> = c
        .events_after(sub.id(), seen.seq)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        summary(&missed),
        [
            (RequestEventKind::Progress, Status::Succeeded),
            (RequestEventKind::Progress, Status::Succeeded),
            (RequestEventKind::Status, Status::Succeeded),
        ],
        "replayed events carry the request as it is now"
    );
    assert!(missed.iter().all(|e| e.seq > seen.seq));
    assert!(missed.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[tokio::test]
async fn an_unknown_request_is_a_404_error_that_ends_the_stream() {
    let s = TestServer::start().await;
    let c = client(&s);
    let mut events = c.events("0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77");
    let err = events.next().await.unwrap().unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(events.next().await.is_none());
}

#[tokio::test]
async fn a_cut_connection_is_resumed_without_loss_or_repeats() {
    let s = TestServer::start().await;
    let proxy = Proxy::start(s.server().addr()).await;
    let direct = client(&s);
    let via_proxy = Client::builder(proxy.url())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let sub = direct.submit("ev", &1).send().await.unwrap();
    let job = claim(&direct, "ev").await;
    let mut events = via_proxy.events(sub.id());
    let mut got = vec![next(&mut events).await];
    for round in 0..3 {
        // Changes land while the connection is cut.
        proxy.cut_all();
        progress(&direct, &job, json!({"round": round})).await;
        got.push(next(&mut events).await);
    }
    direct
        .complete(&job.id, &job.lease_token, &"ok")
        .await
        .unwrap();
    let rest: Vec<_> = events.try_collect().await.unwrap();
    got.extend(rest);
    assert_eq!(got.len(), 5, "{:?}", summary(&got));
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(got[4].request.status, Status::Succeeded);
    // One connection per cut, plus the first.
    assert!(proxy.connections() >= 4, "{}", proxy.connections());
}

#[tokio::test]
async fn a_stream_survives_a_server_restart() {
    let s = TestServer::start().await;
    let c = client(&s);
    let sub = c.submit("ev", &1).send().await.unwrap();
    let job = claim(&c, "ev").await;
    progress(&c, &job, json!("before")).await;
    let consumer = {
        let c = c.clone();
        let id = sub.request.id.clone();
        tokio::spawn(async move { c.events(&id).try_collect::<Vec<_>>().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Same data, same port: the stream reconnects with Last-Event-ID.
    let s = s.restart().await;
    progress(&c, &job, json!("after")).await;
    c.complete(&job.id, &job.lease_token, &"ok").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), consumer)
        .await
        .expect("the stream ends")
        .unwrap()
        .unwrap();
    // (The replayed progress event may already carry the finished request.)
    let kinds: Vec<_> = got.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            RequestEventKind::Status,
            RequestEventKind::Progress,
            RequestEventKind::Status
        ],
        "{:?}",
        summary(&got)
    );
    assert_eq!(got[0].request.status, Status::Running);
    assert_eq!(got[2].request.status, Status::Succeeded);
    assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
    drop(s);
}
