//! `request_claim_parked`, for the stores that park claims (the embedded
//! one): a claim that finds nothing waits in the store and is handed work
//! by the transaction that makes it claimable. Not part of
//! [`crate::conformance_suite!`] — a store that cannot park answers `None`
//! and its claims wait for wake-ups instead; a store that parks runs these
//! cases by name.

use coatcheck_core::{EventKind, Request, Status, Ts};
use tokio::sync::oneshot::error::TryRecvError;

type Answer = tokio::sync::oneshot::Receiver<Result<Vec<Request>>>;

use super::new_request;
use super::support::*;
use crate::{ClaimParams, ParkedClaim, Result, Store};

fn params(queue: &str, worker: &str, max: u32, now: Ts) -> ClaimParams {
    ClaimParams {
        fairness: Default::default(),
        queue: queue.to_string(),
        worker_id: worker.to_string(),
        max,
        lease: LEASE,
        now,
    }
}

/// Parks a claim and waits until the store has taken it in: a store that
/// parks takes commands in order, so once a later call is answered the
/// park was applied.
async fn park(store: &dyn Store, queue: &str, worker: &str, max: u32, now: Ts) -> ParkedClaim {
    let parked = store
        .request_claim_parked(params(queue, worker, max, now))
        .expect("this store parks claims");
    settled_in(store, now).await;
    parked
}

/// A write round trip through the store: every command sent before it
/// has been applied when it returns.
async fn settled_in(store: &dyn Store, now: Ts) {
    claim(store, "q-parked-nothing-here", "w-sync", 1, LEASE, now).await;
}

/// The one request a parked claim was handed, which must be `expected`.
async fn handed(expected: &Request, rx: Answer) -> Request {
    let got = answer(rx).await.expect("claimed");
    assert_eq!(
        got.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [expected.id.as_str()]
    );
    got.into_iter().next().expect("one request")
}

/// Fails a running request for good (no retry).
async fn dead_letter(store: &dyn Store, running: &Request, now: Ts) -> crate::Changed {
    settle(store, &running.id, &token(running), failure(false), now)
        .await
        .expect("dead-lettered")
}

/// Submits to `queue` and asserts no parked claim took it.
async fn submit_stays_queued(store: &dyn Store, queue: &str, now: Ts) -> Request {
    let r = submit_to(store, queue, now).await;
    settled_in(store, now).await;
    assert_eq!(get(store, &r.id).await.status, Status::Queued, "{queue}");
    r
}

fn waiting(parked: &mut ParkedClaim, what: &str) {
    assert!(
        matches!(parked.answer.try_recv(), Err(TryRecvError::Empty)),
        "{what}: the parked claim was answered"
    );
}

/// The parked claim's answer; a claim never handed its work fails the
/// case instead of hanging it.
async fn answer(rx: Answer) -> Result<Vec<Request>> {
    tokio::time::timeout(std::time::Duration::from_secs(10), rx)
        .await
        .expect("the parked claim was not answered")
        .expect("the parked claim is answered")
}

/// A parked claim is answered by the submit that gives its queue work: the
/// request comes back running under the claim's lease, claimed at the
/// submit's time, and that is what is stored.
pub async fn a_parked_claim_is_handed_the_next_submit(store: &dyn Store) {
    let t0 = base();
    let mut parked = park(store, "q-park", "w-parked", 4, t0).await;
    waiting(&mut parked, "an empty queue");
    submit_to(store, "q-park-other", at(t0, 1)).await;
    waiting(&mut parked, "a submit to another queue");

    let t1 = at(t0, 2_000);
    let submitted = submit_to(store, "q-park", t1).await;
    let got = answer(parked.answer).await.expect("claimed");
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(
        (r.id.as_str(), r.status, r.attempts),
        (submitted.id.as_str(), Status::Running, 1)
    );
    let lease = r.lease.as_ref().expect("leased");
    assert_eq!(lease.worker_id, "w-parked");
    assert_eq!(
        lease.expires_at,
        t1 + chrono::Duration::from_std(LEASE).unwrap()
    );
    assert_same(&get(store, &r.id).await, r, "the hand-over is stored");
    assert!(matches!(
        history(store, &r.id).await.last().map(|e| &e.kind),
        Some(EventKind::Claimed { .. })
    ));
}

/// An unparked claim answers at once with nothing and takes nothing later.
pub async fn an_unparked_claim_answers_empty_and_takes_nothing(store: &dyn Store) {
    let t0 = base();
    let parked = park(store, "q-unpark", "w-parked", 4, t0).await;
    parked.handle.unpark();
    let ParkedClaim { answer: rx, handle } = parked;
    assert!(answer(rx).await.expect("no error").is_empty());
    // Unparking again is harmless.
    handle.unpark();
    let later = submit_stays_queued(store, "q-unpark", at(t0, 1)).await;
    assert_eq!(claim_one(store, "q-unpark", at(t0, 2)).await.id, later.id);
}

/// A parked claim whose caller went away (the answer dropped) is never
/// handed work: the next parked claim gets it, or it stays queued.
pub async fn an_abandoned_parked_claim_takes_nothing(store: &dyn Store) {
    let t0 = base();
    drop(park(store, "q-gone", "w-gone", 4, t0).await);
    let live = park(store, "q-gone", "w-live", 4, t0).await;
    let first = submit_to(store, "q-gone", at(t0, 1)).await;
    let got = handed(&first, live.answer).await;
    assert_eq!(got.lease.as_ref().expect("leased").worker_id, "w-live");

    drop(park(store, "q-gone", "w-gone-too", 4, t0).await);
    submit_stays_queued(store, "q-gone", at(t0, 2)).await;
}

/// Parked claims are served oldest first; one that got fewer than its
/// `max` leaves the next one waiting for the next work.
pub async fn parked_claims_are_served_oldest_first(store: &dyn Store) {
    let t0 = base();
    let mut first = park(store, "q-order-park", "w-1", 2, t0).await;
    let mut second = park(store, "q-order-park", "w-2", 2, t0).await;
    let a = submit_to(store, "q-order-park", at(t0, 1)).await;
    settled_in(store, at(t0, 1)).await;
    waiting(&mut second, "the first claim took the work");
    let got = first
        .answer
        .try_recv()
        .expect("the first claim was answered")
        .expect("claimed");
    assert_eq!(
        got.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [a.id.as_str()]
    );

    let b = submit_to(store, "q-order-park", at(t0, 2)).await;
    let got = handed(&b, second.answer).await;
    assert_eq!(got.lease.as_ref().expect("leased").worker_id, "w-2");

    submit_stays_queued(store, "q-order-park", at(t0, 3)).await;
}

/// A delayed request is not handed over at its submit; a poke once it is
/// due hands it over (and a poke before that does not).
pub async fn a_poke_hands_over_a_delayed_request_once_due(store: &dyn Store) {
    let t0 = base();
    let mut parked = park(store, "q-park-delay", "w-parked", 4, t0).await;
    let mut new = new_request("q-park-delay");
    new.delay = Some(secs(60));
    let delayed = submit(store, new, t0).await;
    settled_in(store, t0).await;
    waiting(&mut parked, "a delayed submit");
    parked.handle.poke(at(t0, 59_999));
    settled_in(store, at(t0, 59_999)).await;
    waiting(&mut parked, "a poke before the request is due");
    let due = at(t0, 60_000);
    parked.handle.poke(due);
    let got = handed(&delayed, parked.answer).await;
    assert_eq!(got.run_after, None);
}

/// Work that comes back to a queue other than by a submit — here a
/// redriven dead letter — is handed to a parked claim too.
pub async fn a_redriven_request_is_handed_to_a_parked_claim(store: &dyn Store) {
    let t0 = base();
    let running = running_in(store, "q-park-redrive", t0).await;
    dead_letter(store, &running, at(t0, 1)).await;
    let parked = park(store, "q-park-redrive", "w-parked", 4, at(t0, 2)).await;
    let t3 = at(t0, 3);
    store
        .dead_letter_redrive(crate::RequestRef::any(&running.id), t3)
        .await
        .expect("redriven");
    let got = handed(&running, parked.answer).await;
    assert_eq!((got.status, got.attempts), (Status::Running, 1));
}

/// A dead letter's fallback request is new work in the fallback queue: a
/// claim parked there is handed it by the transaction that spawns it.
pub async fn a_fallback_request_is_handed_to_a_parked_claim(store: &dyn Store) {
    let t0 = base();
    let mut new = new_request("q-park-primary");
    new.max_attempts = 1;
    new.fallback_queue = Some("q-park-fallback".into());
    submit(store, new, t0).await;
    let running = claim_one(store, "q-park-primary", t0).await;
    let parked = park(store, "q-park-fallback", "w-fallback", 4, t0).await;
    let changed = dead_letter(store, &running, at(t0, 1)).await;
    let spawned = changed.spawned.expect("a fallback request");
    let got = handed(&spawned, parked.answer).await;
    assert_eq!(got.queue, "q-park-fallback");
    assert_eq!(got.status, Status::Running);
}

/// A claim that finds nothing and parks in the same batch as a change that
/// frees work — here a lease that ran out, applied right after the claim —
/// is handed that work by the batch's own commit, not left waiting for a
/// later change. The two calls are sent back to back, so they share a batch
/// in most rounds; twenty rounds make sure some do.
pub async fn work_freed_in_the_parking_batch_is_handed_over(store: &dyn Store) {
    let t0 = base();
    let expired = at(t0, LEASE.as_millis() as u64 + 1_000);
    for round in 0..20 {
        let queue = format!("q-park-same-batch-{round}");
        let running = running_in(store, &queue, t0).await;
        let parked = store
            .request_claim_parked(params(&queue, "w-parked", 1, expired))
            .expect("this store parks claims");
        let changed = store.lease_expire_due(expired, 256).await.expect("expired");
        assert!(
            changed.iter().any(|c| c.request.id == running.id),
            "round {round}"
        );
        let got = handed(&running, parked.answer).await;
        assert_eq!(
            (got.status, got.attempts),
            (Status::Running, 2),
            "round {round}"
        );
    }
}
