//! Reply channels: a terminal transition of a request with a channel return
//! address appends exactly one reply message in the same write; receive
//! hides under a visibility timeout and redelivers; ack removes; channels
//! are per tenant; retention purges; a fallback chain replies once.

use std::time::Duration;

use coatcheck_core::clock::to_micros;
use coatcheck_core::wire::ChannelMessage;
use coatcheck_core::{EventKind, ReplyTo, Request, Status, Ts};

use super::support::*;
use super::{new_request, TENANT};
use crate::{Changed, ChannelReceiveParams, DueTimes, HeartbeatParams, Store};

/// The channel most cases reply to.
const CH: &str = "c1";

/// A default submission to `queue` replying to channel `channel`.
fn replying(queue: &str, channel: &str) -> coatcheck_core::rules::NewRequest {
    let mut new = new_request(queue);
    new.reply_to = Some(ReplyTo::Channel(channel.to_string()));
    new.correlation_id = Some(format!("corr-{queue}"));
    new
}

/// Receives up to `max` messages of `tenant`'s `channel` at `now`.
async fn receive_as(
    store: &dyn Store,
    tenant: &str,
    channel: &str,
    max: u32,
    visibility: Duration,
    now: Ts,
) -> Vec<ChannelMessage> {
    let p = ChannelReceiveParams {
        tenant: tenant.to_string(),
        channel: channel.to_string(),
        max,
        visibility,
        now,
    };
    store.channel_receive(p).await.expect("channel_receive")
}

/// Receives up to 100 messages of [`TENANT`]'s `channel`, hidden 10 s.
async fn receive(store: &dyn Store, channel: &str, now: Ts) -> Vec<ChannelMessage> {
    receive_as(store, TENANT, channel, 100, secs(10), now).await
}

/// Acks `tokens` on [`TENANT`]'s `channel`.
async fn ack(store: &dyn Store, channel: &str, tokens: &[&str], now: Ts) -> Vec<bool> {
    let tokens = tokens.iter().map(|t| t.to_string()).collect();
    store
        .channel_ack(TENANT.into(), channel.into(), tokens, now)
        .await
        .expect("channel_ack")
}

/// Asserts `m` is the first delivery of the reply to `req` (as stored now).
#[track_caller]
fn assert_reply_of(m: &ChannelMessage, req: &Request) {
    let r = &m.message;
    assert!(!r.message_id.is_empty(), "a message id");
    assert_eq!(r.request_id, req.id);
    assert_eq!(r.correlation_id, req.correlation_id);
    assert_eq!(
        (r.queue.as_str(), r.status),
        (req.queue.as_str(), req.status)
    );
    assert!(
        Request::same_output(r.output.as_deref(), req.output.as_deref()),
        "the output bytes: {:?} vs {:?}",
        r.output,
        req.output
    );
    assert_eq!(
        r.error
            .as_ref()
            .map(|e| (e.code.clone(), e.message.clone())),
        req.error
            .as_ref()
            .map(|e| (e.code.clone(), e.message.clone()))
    );
    assert_eq!(r.finished_at.map(to_micros), req.finished_at.map(to_micros));
    assert!(req.finished_at.is_some(), "the request is finished");
    assert!(!m.ack_token.is_empty());
    assert_eq!(m.delivery_count, 1);
}

/// Asserts the history ends with `terminal` then `reply_delivered` to a channel.
async fn assert_replied(store: &dyn Store, id: &str, terminal: &str) {
    let events = history(store, id).await;
    let n = events.len();
    assert!(n >= 2, "{events:?}");
    assert_eq!(events[n - 2].kind.name(), terminal, "{events:?}");
    match &events[n - 1].kind {
        EventKind::ReplyDelivered {
            target,
            attempt,
            http_status,
        } => assert_eq!(
            (target.as_str(), *attempt, *http_status),
            ("channel", 1, None)
        ),
        other => panic!("expected reply_delivered, got {other:?}"),
    }
    assert_eq!(events[n - 1].at, events[n - 2].at, "in the same write");
    let stored = get(store, id).await;
    assert_eq!(stored.history_seq, events[n - 1].seq);
}

/// Asserts a change carries a channel reply to [`CH`].
#[track_caller]
fn assert_reply_to_channel(c: &Changed) {
    assert_eq!(
        c.reply,
        Some(ReplyTo::Channel(CH.into())),
        "the change's reply"
    );
}

/// Completing appends exactly one reply in the same write, with
/// `reply_delivered` in the history; the transitions before it (claim,
/// progress, a retryable failure) append nothing, nor does repeating the
/// completion with the same token.
pub async fn terminal_transition_appends_exactly_one_reply(store: &dyn Store) {
    let t0 = base();
    let mut new = replying("q-reply", CH);
    new.max_attempts = 2;
    let req = submit(store, new, t0).await;
    let first = claim_one(store, "q-reply", t0).await;
    let beat = HeartbeatParams {
        id: req.id.clone(),
        lease_token: token(&first),
        progress: Some(raw(r#"{"pct":50}"#)),
        extend: None,
        now: at(t0, 100),
    };
    let c = store.lease_heartbeat(beat).await.expect("heartbeat");
    assert_eq!(c.reply, None, "progress sends no reply");
    let c = settle(store, &req.id, &token(&first), failure(true), at(t0, 200))
        .await
        .expect("retryable fail");
    assert_eq!(c.reply, None, "a retry sends no reply");
    assert!(receive(store, CH, at(t0, 300)).await.is_empty());

    let second = claim_one(store, "q-reply", at(t0, 60_000)).await;
    let t1 = at(t0, 61_000);
    let done = settle(
        store,
        &req.id,
        &token(&second),
        completion(r#"{"ok": true}"#),
        t1,
    )
    .await
    .expect("complete");
    assert_reply_to_channel(&done);
    assert_same(&get(store, &req.id).await, &done.request, "as stored");
    assert_replied(store, &req.id, "succeeded").await;

    let again = settle(
        store,
        &req.id,
        &token(&second),
        completion(r#"{"ok": true}"#),
        at(t1, 5),
    )
    .await
    .expect("a repeated complete");
    assert_eq!(again.reply, None, "an idempotent repeat sends no reply");
    assert_eq!(again.request.history_seq, done.request.history_seq);

    let got = receive(store, CH, at(t1, 10)).await;
    assert_eq!(got.len(), 1, "exactly one reply: {got:?}");
    assert_reply_of(&got[0], &done.request);
    assert_eq!(
        got[0].message.output.as_ref().map(|o| o.get()),
        Some(r#"{"ok": true}"#)
    );
    assert!(got[0].message.error.is_none());
}

/// Failed (not retryable, and by lease expiry), cancelled (queued, and
/// running after a cancel request) and expired requests reply too, each
/// once, with its error.
pub async fn failed_cancelled_and_expired_requests_reply(store: &dyn Store) {
    let t0 = base();
    // Not retryable: failed.
    let failed = submit(store, replying("q-f", CH), t0).await;
    let c = claim_one(store, "q-f", t0).await;
    let ch = settle(store, &failed.id, &token(&c), failure(false), at(t0, 1_000))
        .await
        .expect("fail");
    assert_reply_to_channel(&ch);
    assert_replied(store, &failed.id, "failed").await;

    // Cancel of a queued request.
    let queued = submit(store, replying("q-c", CH), t0).await;
    let (_, ch) = store
        .request_cancel(as_tenant(&queued.id, TENANT), at(t0, 2_000))
        .await
        .expect("cancel");
    assert_reply_to_channel(&ch);
    assert_replied(store, &queued.id, "cancelled").await;

    // Cancel of a running one asks only; the worker's failure then cancels.
    let running = submit(store, replying("q-cr", CH), t0).await;
    let c = claim_one(store, "q-cr", t0).await;
    let (_, ch) = store
        .request_cancel(as_tenant(&running.id, TENANT), at(t0, 2_500))
        .await
        .expect("cancel request");
    assert_eq!(ch.reply, None, "a cancel request is not terminal");
    let ch = settle(store, &running.id, &token(&c), failure(true), at(t0, 3_000))
        .await
        .expect("give up");
    assert_eq!(ch.request.status, Status::Cancelled);
    assert_reply_to_channel(&ch);
    assert_replied(store, &running.id, "cancelled").await;

    // Lease expiry with no attempts left: failed.
    let mut new = replying("q-l", CH);
    new.max_attempts = 1;
    let leased = submit(store, new, t0).await;
    claim(store, "q-l", WORKER, 1, secs(2), at(t0, 2_000)).await;
    let changed = store
        .lease_expire_due(at(t0, 4_000), 10)
        .await
        .expect("reap");
    assert_eq!(changed.len(), 1);
    assert_reply_to_channel(&changed[0]);
    assert_replied(store, &leased.id, "failed").await;

    // Deadline: expired.
    let mut new = replying("q-d", CH);
    new.timeout = Some(secs(5));
    let expiring = submit(store, new, t0).await;
    let changed = store
        .deadline_expire_due(at(t0, 5_000), 10)
        .await
        .expect("expire");
    assert_eq!(changed.len(), 1);
    assert_reply_to_channel(&changed[0]);
    assert_replied(store, &expiring.id, "expired").await;

    // One message each, oldest (first appended) first, with the errors.
    let got = receive(store, CH, at(t0, 6_000)).await;
    let want = [
        (&failed.id, Status::Failed, "boom"),
        (&queued.id, Status::Cancelled, "cancelled"),
        (&running.id, Status::Cancelled, "cancelled"),
        (&leased.id, Status::Failed, "lease_expired"),
        (&expiring.id, Status::Expired, "deadline_exceeded"),
    ];
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (m, (id, status, code)) in got.iter().zip(want) {
        assert_reply_of(m, &get(store, id).await);
        assert_eq!(m.message.status, status);
        assert_eq!(
            m.message.error.as_ref().and_then(|e| e.code.as_deref()),
            Some(code)
        );
        assert!(m.message.output.is_none());
    }
}

/// Completes a fresh request replying to `channel` in `queue` at `now`.
async fn replied(store: &dyn Store, queue: &str, channel: &str, now: Ts) -> Request {
    let req = submit(store, replying(queue, channel), now).await;
    let c = claim_one(store, queue, now).await;
    settle(store, &req.id, &token(&c), completion("1"), now)
        .await
        .expect("complete")
        .request
}

/// A received message is hidden for its visibility, then delivered again:
/// the same message id, a new ack token, a delivery count of 2.
pub async fn receive_hides_then_redelivers_after_visibility(store: &dyn Store) {
    let t0 = base();
    let req = replied(store, "q-vis", CH, t0).await;
    let t1 = at(t0, 1_000);
    let first = receive_as(store, TENANT, CH, 10, secs(10), t1).await;
    assert_eq!(first.len(), 1);
    assert_reply_of(&first[0], &req);
    assert!(receive(store, CH, at(t1, 5_000)).await.is_empty(), "hidden");
    assert!(
        receive(store, CH, at(t1, 9_999)).await.is_empty(),
        "still hidden"
    );

    let second = receive_as(store, TENANT, CH, 10, secs(10), at(t1, 10_000)).await;
    assert_eq!(second.len(), 1, "visible again after 10 s");
    let (a, b) = (&first[0], &second[0]);
    assert_eq!(
        b.message.message_id, a.message.message_id,
        "the same message"
    );
    assert_eq!(b.message.request_id, req.id);
    assert_ne!(b.ack_token, a.ack_token, "a new ack token");
    assert_eq!(b.delivery_count, 2);
    let third = receive_as(store, TENANT, CH, 10, secs(1), at(t1, 20_000)).await;
    assert_eq!(third[0].delivery_count, 3);
    assert_eq!(third[0].message.message_id, a.message.message_id);
}

/// An ack with the current token removes the message for good; unknown
/// tokens, or tokens for another channel, are `false`.
pub async fn ack_with_the_current_token_removes_the_message(store: &dyn Store) {
    let t0 = base();
    replied(store, "q-ack", CH, t0).await;
    replied(store, "q-ack2", CH, t0).await;
    let got = receive(store, CH, at(t0, 1_000)).await;
    assert_eq!(got.len(), 2);
    let (a, b) = (got[0].ack_token.as_str(), got[1].ack_token.as_str());
    assert_eq!(
        ack(store, "other", &[a], at(t0, 2_000)).await,
        [false],
        "another channel's token"
    );
    let other_tenant = store
        .channel_ack("t2".into(), CH.into(), vec![a.to_string()], at(t0, 2_000))
        .await
        .expect("ack");
    assert_eq!(other_tenant, [false], "another tenant's channel");
    assert_eq!(
        ack(store, CH, &[a, "no-such-token"], at(t0, 2_000)).await,
        [true, false]
    );
    assert_eq!(
        ack(store, CH, &[a], at(t0, 2_001)).await,
        [false],
        "acked already"
    );
    let later = receive(store, CH, at(t0, 60_000)).await;
    assert_eq!(later.len(), 1, "only the unacked one comes back");
    assert_eq!(later[0].message.message_id, got[1].message.message_id);
    assert_eq!(
        ack(store, CH, &[b], at(t0, 60_001)).await,
        [false],
        "b's token is stale"
    );
    assert_eq!(
        ack(store, CH, &[&later[0].ack_token], at(t0, 60_001)).await,
        [true]
    );
    assert!(receive(store, CH, at(t0, 600_000)).await.is_empty());
}

/// A token whose visibility ran out is stale: the ack is `false` and the
/// message stays, to be delivered again (even before anyone received it anew).
pub async fn ack_with_a_stale_token_keeps_the_message(store: &dyn Store) {
    let t0 = base();
    replied(store, "q-stale", CH, t0).await;
    let first = receive(store, CH, at(t0, 1_000)).await;
    let stale = first[0].ack_token.clone();
    assert_eq!(
        ack(store, CH, &[&stale], at(t0, 11_000)).await,
        [false],
        "visibility ran out"
    );
    let again = receive(store, CH, at(t0, 11_000)).await;
    assert_eq!(again.len(), 1, "the message stayed");
    assert_eq!(again[0].message.message_id, first[0].message.message_id);
    assert_eq!(again[0].delivery_count, 2);
    assert_eq!(ack(store, CH, &[&stale], at(t0, 11_001)).await, [false]);
    assert_eq!(
        ack(store, CH, &[&again[0].ack_token], at(t0, 11_001)).await,
        [true]
    );
    assert!(receive(store, CH, at(t0, 100_000)).await.is_empty());
}

/// Channels need no creation, and are per tenant and per name.
pub async fn channels_are_per_tenant_and_name(store: &dyn Store) {
    let t0 = base();
    let mine = replied(store, "q-t1", CH, t0).await;
    let mut new = replying("q-t2", CH);
    new.tenant = "t2".into();
    let theirs = submit(store, new, t0).await;
    let c = claim_one(store, "q-t2", t0).await;
    settle(store, &theirs.id, &token(&c), completion("2"), t0)
        .await
        .expect("complete");
    let other = replied(store, "q-other", "c2", t0).await;

    let t1 = at(t0, 1_000);
    let got = receive_as(store, TENANT, CH, 10, secs(10), t1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.request_id, mine.id);
    let got = receive_as(store, "t2", CH, 10, secs(10), t1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.request_id, theirs.id);
    let got = receive_as(store, TENANT, "c2", 10, secs(10), t1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.request_id, other.id);
    assert!(receive_as(store, "t2", "c2", 10, secs(10), t1)
        .await
        .is_empty());
    assert!(receive_as(store, "t3", CH, 10, secs(10), t1)
        .await
        .is_empty());
}

/// A receive takes at most `max` messages, oldest first.
pub async fn receive_respects_max_oldest_first(store: &dyn Store) {
    let t0 = base();
    let mut ids = Vec::new();
    for i in 0..5u64 {
        ids.push(
            replied(store, &format!("q-max{i}"), CH, at(t0, i * 10))
                .await
                .id,
        );
    }
    let t1 = at(t0, 1_000);
    let got = receive_as(store, TENANT, CH, 2, secs(10), t1).await;
    let got_ids: Vec<_> = got.iter().map(|m| m.message.request_id.clone()).collect();
    assert_eq!(got_ids, ids[..2]);
    let got = receive_as(store, TENANT, CH, 1, secs(10), t1).await;
    assert_eq!(got[0].message.request_id, ids[2]);
    let got = receive_as(store, TENANT, CH, 100, secs(10), t1).await;
    let got_ids: Vec<_> = got.iter().map(|m| m.message.request_id.clone()).collect();
    assert_eq!(got_ids, ids[3..]);
    assert!(receive_as(store, TENANT, CH, 100, secs(10), t1)
        .await
        .is_empty());
    // Redelivered ones come back in their original order.
    let got = receive_as(store, TENANT, CH, 3, secs(10), at(t1, 10_000)).await;
    let got_ids: Vec<_> = got.iter().map(|m| m.message.request_id.clone()).collect();
    assert_eq!(got_ids, ids[..3]);
}

/// Retention deletes messages created before the cutoff (received or not),
/// at most `limit`, oldest first; newer ones stay.
pub async fn channel_purge_deletes_only_older_messages(store: &dyn Store) {
    let t0 = base();
    let a = replied(store, "q-p1", CH, t0).await;
    let b = replied(store, "q-p2", "c2", at(t0, 10_000)).await;
    let c = replied(store, "q-p3", CH, at(t0, 20_000)).await;
    receive(store, CH, at(t0, 20_500)).await; // a and c received, unacked

    assert_eq!(
        store.channel_purge(t0, 100).await.expect("purge"),
        0,
        "strictly before"
    );
    assert_eq!(
        store.channel_purge(at(t0, 15_000), 1).await.expect("purge"),
        1,
        "the limit"
    );
    assert_eq!(
        store
            .channel_purge(at(t0, 15_000), 100)
            .await
            .expect("purge"),
        1
    );
    assert_eq!(
        store
            .channel_purge(at(t0, 15_000), 100)
            .await
            .expect("purge"),
        0
    );

    let t1 = at(t0, 60_000);
    let left = receive(store, CH, t1).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message.request_id, c.id);
    assert!(receive(store, "c2", t1).await.is_empty(), "b is gone");
    // The requests themselves are untouched.
    for r in [&a, &b, &c] {
        assert_unchanged(store, r, "retention").await;
    }
}

/// `due_times.channel_visible` is the earliest time a received, unacked
/// message becomes visible again, while that is in the future.
pub async fn due_times_report_when_a_received_message_becomes_visible(store: &dyn Store) {
    let t0 = base();
    let none = DueTimes::default();
    replied(store, "q-due1", CH, t0).await;
    replied(store, "q-due2", "c2", t0).await;
    assert_eq!(
        store.due_times(t0).await.expect("due"),
        none,
        "not yet received"
    );

    let t1 = at(t0, 1_000);
    let got = receive_as(store, TENANT, CH, 10, secs(30), t1).await;
    receive_as(store, TENANT, "c2", 10, secs(10), t1).await;
    let due = store.due_times(t1).await.expect("due");
    assert_eq!(due.channel_visible, Some(at(t1, 10_000)));
    assert_eq!(
        (due.lease_expiry, due.deadline, due.run_after, due.webhook),
        (None, None, None, None)
    );
    let due = store.due_times(at(t1, 10_000)).await.expect("due");
    assert_eq!(
        due.channel_visible,
        Some(at(t1, 30_000)),
        "only future times"
    );
    ack(store, CH, &[&got[0].ack_token], at(t1, 10_000)).await;
    let due = store.due_times(at(t1, 10_000)).await.expect("due");
    assert_eq!(due.channel_visible, None, "acked: nothing more to wake for");
}

/// A request that dead-letters into a fallback sends no reply itself; the
/// fallback inherits the return address and replies — once, for the last
/// request of the chain.
pub async fn fallback_chain_replies_once_for_its_last_request(store: &dyn Store) {
    let t0 = base();
    let mut new = replying("q-primary", CH);
    new.max_attempts = 1;
    new.fallback_queue = Some("q-fallback".into());
    let first = submit(store, new, t0).await;
    let c = claim_one(store, "q-primary", t0).await;
    let changed = settle(store, &first.id, &token(&c), failure(false), at(t0, 1_000))
        .await
        .expect("fail");
    let fb = changed.spawned.clone().expect("a fallback");
    assert_eq!(changed.reply, None, "handed to the fallback: no reply");
    assert_eq!(fb.reply_to, Some(ReplyTo::Channel(CH.into())));
    let k = kinds(store, &first.id).await;
    assert_eq!(k.last(), Some(&"fallback_submitted"), "{k:?}");
    assert!(!k.contains(&"reply_delivered"), "{k:?}");
    assert!(receive(store, CH, at(t0, 1_500)).await.is_empty());

    let c = claim_one(store, "q-fallback", at(t0, 2_000)).await;
    assert_eq!(c.id, fb.id);
    let done = settle(
        store,
        &fb.id,
        &token(&c),
        completion(r#""fb""#),
        at(t0, 3_000),
    )
    .await
    .expect("complete");
    assert_reply_to_channel(&done);
    assert_replied(store, &fb.id, "succeeded").await;
    let got = receive(store, CH, at(t0, 4_000)).await;
    assert_eq!(got.len(), 1, "one reply for the chain: {got:?}");
    assert_reply_of(&got[0], &done.request);
    assert_eq!(got[0].message.queue, "q-fallback");
    assert_eq!(got[0].message.correlation_id, first.correlation_id);
}
