//! Small helpers the cases share: time, shortcuts for the common calls, and
//! a full snapshot of a request for "refused means unchanged".

use std::fmt::Debug;
use std::time::Duration;

use coatcheck_core::clock::{add, from_micros, to_micros};
use coatcheck_core::rules::NewRequest;
use coatcheck_core::{ErrorInfo, HistoryEvent, Request, Ts};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::{
    Changed, ClaimParams, Idempotency, RequestRef, Result, SettleParams, Settlement, Store,
    StoreError, SubmitParams, Submitted,
};

/// The worker most cases claim as.
pub(crate) const WORKER: &str = "w-1";

/// The lease most cases claim with.
pub(crate) const LEASE: Duration = Duration::from_secs(30);

/// The base of a case's timeline: now, in whole microseconds.
pub(crate) fn base() -> Ts {
    from_micros(to_micros(chrono::Utc::now()))
}

/// `t0` plus `ms` milliseconds.
pub(crate) fn at(t0: Ts, ms: u64) -> Ts {
    add(t0, Duration::from_millis(ms))
}

/// Seconds as a duration.
pub(crate) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// JSON text kept byte for byte.
pub(crate) fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_string()).expect("valid JSON")
}

/// JSON text as a value (for payloads a store may keep as JSON rather than
/// bytes, such as those inside history events).
pub(crate) fn json(text: &str) -> Value {
    serde_json::from_str(text).expect("valid JSON")
}

/// The error of a call that must fail.
pub(crate) fn expect_err<T: Debug>(res: Result<T>, what: &str) -> StoreError {
    match res {
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
        Err(e) => e,
    }
}

/// Submits and expects a new request.
pub(crate) async fn submit(store: &dyn Store, new: NewRequest, now: Ts) -> Request {
    submit_with(store, new, None, now).await.expect("submit")
}

/// Submits with an optional idempotency key and hash, and expects a new request.
pub(crate) async fn submit_with(
    store: &dyn Store,
    new: NewRequest,
    idem: Option<(&str, &str)>,
    now: Ts,
) -> Result<Request> {
    match submit_raw(store, new, idem, now).await? {
        Submitted::Created(r) => Ok(r),
        Submitted::Replayed(r) => panic!("expected a new request, got a replay of {}", r.id),
    }
}

/// Submits with an optional idempotency key and hash.
pub(crate) async fn submit_raw(
    store: &dyn Store,
    new: NewRequest,
    idem: Option<(&str, &str)>,
    now: Ts,
) -> Result<Submitted> {
    store.request_submit(submit_params(new, idem, now)).await
}

/// What [`submit_raw`] submits: `new` with an optional idempotency key and hash.
pub(crate) fn submit_params(new: NewRequest, idem: Option<(&str, &str)>, now: Ts) -> SubmitParams {
    let idempotency = idem.map(|(key, hash)| Idempotency {
        key: key.to_string(),
        body_hash: hash.to_string(),
    });
    SubmitParams {
        new,
        idempotency,
        now,
    }
}

/// Submits a default request to `queue`.
pub(crate) async fn submit_to(store: &dyn Store, queue: &str, now: Ts) -> Request {
    submit(store, super::new_request(queue), now).await
}

/// Claims up to `max` from `queue`.
pub(crate) async fn claim(
    store: &dyn Store,
    queue: &str,
    worker: &str,
    max: u32,
    lease: Duration,
    now: Ts,
) -> Vec<Request> {
    let p = ClaimParams {
        fairness: Default::default(),
        queue: queue.to_string(),
        worker_id: worker.to_string(),
        max,
        lease,
        now,
    };
    store.request_claim(p).await.expect("claim")
}

/// Claims exactly one request from `queue` as [`WORKER`] under [`LEASE`].
pub(crate) async fn claim_one(store: &dyn Store, queue: &str, now: Ts) -> Request {
    let mut got = claim(store, queue, WORKER, 1, LEASE, now).await;
    assert_eq!(
        got.len(),
        1,
        "expected one claimable request in {queue} at {now}"
    );
    got.remove(0)
}

/// Submits a default request to `queue` and claims it (as the only one there).
pub(crate) async fn running_in(store: &dyn Store, queue: &str, now: Ts) -> Request {
    let submitted = submit_to(store, queue, now).await;
    let claimed = claim_one(store, queue, now).await;
    assert_eq!(claimed.id, submitted.id);
    claimed
}

/// The live lease token of a claimed request.
pub(crate) fn token(req: &Request) -> String {
    req.lease.as_ref().expect("a leased request").token.clone()
}

/// A completion with this output.
pub(crate) fn completion(output: &str) -> Settlement {
    Settlement::Complete {
        output: raw(output),
    }
}

/// A failure with an error `boom` and no `retry_after`.
pub(crate) fn failure(retryable: bool) -> Settlement {
    Settlement::Fail {
        error: boom(),
        retryable,
        retry_after: None,
    }
}

/// The error the cases fail with.
pub(crate) fn boom() -> ErrorInfo {
    ErrorInfo {
        code: Some("boom".into()),
        message: "it broke".into(),
        details: Some(serde_json::json!({"line": 3})),
    }
}

/// Settles one request (through `request_settle_many`).
pub(crate) async fn settle(
    store: &dyn Store,
    id: &str,
    lease_token: &str,
    settlement: Settlement,
    now: Ts,
) -> Result<Changed> {
    let item = SettleParams {
        queue: None,
        id: id.to_string(),
        lease_token: lease_token.to_string(),
        settlement,
    };
    let mut out = store
        .request_settle_many(vec![item], now)
        .await
        .expect("settle_many itself");
    assert_eq!(out.len(), 1, "one result per item");
    out.remove(0)
}

/// A request as any tenant sees it.
pub(crate) async fn get(store: &dyn Store, id: &str) -> Request {
    store.request_get(RequestRef::any(id)).await.expect("get")
}

/// A request's whole history.
pub(crate) async fn history(store: &dyn Store, id: &str) -> Vec<HistoryEvent> {
    store
        .request_history(RequestRef::any(id), 0)
        .await
        .expect("history")
}

/// The kinds of a request's history, oldest first.
pub(crate) async fn kinds(store: &dyn Store, id: &str) -> Vec<&'static str> {
    history(store, id)
        .await
        .iter()
        .map(|e| e.kind.name())
        .collect()
}

/// A scoped reference.
pub(crate) fn as_tenant(id: &str, tenant: &str) -> RequestRef {
    RequestRef {
        id: id.to_string(),
        tenant: Some(tenant.to_string()),
    }
}

/// Every field of a request, private ones included, as JSON; timestamps in
/// whole microseconds and JSON payloads as their exact text.
pub(crate) fn snapshot(req: &Request) -> Value {
    let mut v = serde_json::to_value(req).expect("a request serializes");
    let obj = v.as_object_mut().expect("an object");
    for (key, ts) in [
        ("created_at", Some(req.created_at)),
        ("updated_at", Some(req.updated_at)),
        ("run_after", req.run_after),
        ("deadline", req.deadline),
        ("finished_at", req.finished_at),
    ] {
        obj.insert(key.into(), json!(ts.map(to_micros)));
    }
    obj.insert("input".into(), json!(req.input.get()));
    obj.insert("output".into(), json!(req.output.as_ref().map(|o| o.get())));
    obj.insert(
        "progress".into(),
        json!(req.progress.as_ref().map(|p| p.get())),
    );
    obj.insert("tenant".into(), json!(req.tenant));
    obj.insert(
        "lease".into(),
        json!(req.lease.as_ref().map(|l| json!({
            "token": l.token,
            "worker_id": l.worker_id,
            "expires_at": to_micros(l.expires_at),
            "duration_ms": l.duration_ms,
        }))),
    );
    obj.insert("last_lease_token".into(), json!(req.last_lease_token));
    obj.insert("history_seq".into(), json!(req.history_seq));
    v
}

/// Asserts two requests are the same in every field.
#[track_caller]
pub(crate) fn assert_same(actual: &Request, expected: &Request, what: &str) {
    assert_eq!(snapshot(actual), snapshot(expected), "{what}");
}

/// Asserts the stored request is exactly `before` and its history ends at
/// `before.history_seq`: what a refused operation must leave behind.
pub(crate) async fn assert_unchanged(store: &dyn Store, before: &Request, what: &str) {
    let now = get(store, &before.id).await;
    assert_eq!(
        snapshot(&now),
        snapshot(before),
        "{what}: the request changed"
    );
    let events = history(store, &before.id).await;
    assert_eq!(
        events.last().map(|e| e.seq).unwrap_or(0),
        before.history_seq,
        "{what}: the history changed: {:?}",
        events.iter().map(|e| e.kind.name()).collect::<Vec<_>>()
    );
}

/// Asserts a [`Changed`] result is what the store now holds, and that it
/// spawned no fallback.
pub(crate) async fn assert_stored(store: &dyn Store, changed: &Changed, what: &str) {
    assert!(
        changed.spawned.is_none(),
        "{what}: unexpected fallback {:?}",
        changed.spawned
    );
    let stored = get(store, &changed.request.id).await;
    assert_same(
        &stored,
        &changed.request,
        &format!("{what}: the returned request is not what was stored"),
    );
}
