//! # coatcheck-store
//!
//! The **internal** storage seam of coatcheck. The server's engine talks to a
//! [`Store`]; the embedded SQLite store and the PostgreSQL store implement it.
//! It is not a public plugin API and may change with any release.
//!
//! Key decisions:
//! - A store never decides what a transition does: it loads the request,
//!   calls the pure rule in `coatcheck_core::rules`, and persists the request
//!   and its history events in one transaction. Every store therefore behaves
//!   the same by construction, and the conformance suite
//!   (feature `conformance`) proves it.
//! - All time comes in through the params (`now`), so tests drive leases,
//!   backoff and deadlines with a manual clock.
//! - Methods read like an index: Noun + Verb, a params struct, batch forms
//!   where the protocol batches (claims take `max`, settlements are a batch).
//! - Errors are classified into kinds the engine acts on ([`StoreError`]);
//!   nothing above a store matches SQLite or PostgreSQL codes.

use std::time::Duration;

use async_trait::async_trait;
use coatcheck_core::rules::{CancelOutcome, NewRequest};
use coatcheck_core::{
    ErrorInfo, HistoryEvent, ReplyTo, Request, RetryPolicy, RuleError, Status, Ts,
};
use serde_json::value::RawValue;

#[cfg(feature = "conformance")]
pub mod conformance;

/// A store failure, classified.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No such request (or not visible to this tenant).
    #[error("no such request")]
    NotFound,
    /// The transition is not allowed in the request's current state.
    #[error("the request is {status}")]
    WrongState {
        /// Its current status.
        status: Status,
    },
    /// The lease token is not the request's live lease (fencing).
    #[error("the lease token is not the current lease of this request (it is {status})")]
    LeaseLost {
        /// Its current status.
        status: Status,
    },
    /// An idempotency key was reused with a different request body.
    #[error("the idempotency key was already used with a different request")]
    IdempotencyMismatch,
    /// The store cannot be reached or is shutting down; retrying later may work.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug or corrupt data.
    #[error("store failure: {0}")]
    Internal(String),
}

impl From<RuleError> for StoreError {
    fn from(e: RuleError) -> Self {
        match e {
            RuleError::WrongState { status } => StoreError::WrongState { status },
            RuleError::LeaseLost { status } => StoreError::LeaseLost { status },
            _ => StoreError::Internal(e.to_string()),
        }
    }
}

/// Result alias for store calls.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which request, as seen by whom: `tenant: None` sees every tenant (admin,
/// workers); `Some(t)` sees only `t`'s requests, others are [`StoreError::NotFound`].
#[derive(Debug, Clone)]
pub struct RequestRef {
    /// The request id.
    pub id: String,
    /// The tenant scope.
    pub tenant: Option<String>,
}

impl RequestRef {
    /// Any tenant's request.
    pub fn any(id: impl Into<String>) -> Self {
        RequestRef {
            id: id.into(),
            tenant: None,
        }
    }
}

/// Idempotency of a submit: the key and a hash of the canonical body (queue
/// included). Same key and hash → the existing request; same key, other hash
/// → [`StoreError::IdempotencyMismatch`].
#[derive(Debug, Clone)]
pub struct Idempotency {
    /// The client's `Idempotency-Key`.
    pub key: String,
    /// Hash of what was submitted.
    pub body_hash: String,
}

/// `request_submit` params.
#[derive(Debug, Clone)]
pub struct SubmitParams {
    /// The request to create.
    pub new: NewRequest,
    /// Optional idempotency, scoped to `new.tenant`.
    pub idempotency: Option<Idempotency>,
    /// Now.
    pub now: Ts,
}

/// What a submit did.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// A new request was stored (durably).
    Created(Request),
    /// The idempotency key matched an earlier request; nothing new was stored.
    Replayed(Request),
}

/// How claims share a queue among fairness keys: within a priority level
/// they rotate across keys (A1, B1, A2, B2 … not A1..A1000 then B1), taking
/// `weight` requests of a key per turn (default 1), and skipping a key that
/// already has `cap` requests running.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FairnessRules {
    /// Requests per turn, by key (default 1).
    pub weights: std::collections::HashMap<String, u32>,
    /// Most requests running at once, by key.
    pub caps: std::collections::HashMap<String, u32>,
    /// The cap of keys not in `caps` (`None`: no cap).
    pub default_cap: Option<u32>,
}

impl FairnessRules {
    /// Requests a key gets per turn.
    pub fn weight(&self, key: &str) -> u32 {
        self.weights.get(key).copied().unwrap_or(1).max(1)
    }

    /// The running cap of a key.
    pub fn cap(&self, key: &str) -> Option<u32> {
        self.caps.get(key).copied().or(self.default_cap)
    }
}

/// `request_claim` params.
#[derive(Debug, Clone)]
pub struct ClaimParams {
    /// The queue.
    pub queue: String,
    /// Who claims.
    pub worker_id: String,
    /// At most this many.
    pub max: u32,
    /// The lease length.
    pub lease: Duration,
    /// How keys share the queue.
    pub fairness: std::sync::Arc<FairnessRules>,
    /// Now.
    pub now: Ts,
}

/// `lease_heartbeat` params.
#[derive(Debug, Clone)]
pub struct HeartbeatParams {
    /// The request.
    pub id: String,
    /// The fencing token.
    pub lease_token: String,
    /// Progress to record.
    pub progress: Option<Box<RawValue>>,
    /// Renew by this much (default: the lease's length).
    pub extend: Option<Duration>,
    /// Now.
    pub now: Ts,
}

/// How a running request is settled.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Complete with this output.
    Complete {
        /// The output bytes as received.
        output: Box<RawValue>,
    },
    /// Fail this attempt.
    Fail {
        /// What went wrong.
        error: ErrorInfo,
        /// Whether another attempt may help.
        retryable: bool,
        /// Wait this long before the next attempt (else the policy's backoff).
        retry_after: Option<Duration>,
    },
}

/// One settlement of `request_settle_many`.
#[derive(Debug, Clone)]
pub struct SettleParams {
    /// The request.
    pub id: String,
    /// If set, the request must be in this queue, else [`StoreError::NotFound`]
    /// (the batch settlements route is per queue).
    pub queue: Option<String>,
    /// The fencing token.
    pub lease_token: String,
    /// Complete or fail.
    pub settlement: Settlement,
}

/// A request after a write, and a fallback request the write created, if any.
#[derive(Debug, Clone)]
pub struct Changed {
    /// The request after the change.
    pub request: Request,
    /// A fallback request submitted because this one dead-lettered.
    pub spawned: Option<Request>,
    /// The reply the change produced, in the same transaction: appended to
    /// a channel, or queued for webhook delivery.
    pub reply: Option<ReplyTo>,
}

impl Changed {
    /// A change of one request, nothing spawned, no reply.
    pub fn new(request: Request) -> Self {
        Changed {
            request,
            spawned: None,
            reply: None,
        }
    }
}

impl WebhookOutcome {
    /// The history event this attempt records on its request (with the next
    /// attempt's time as the store keeps it).
    pub fn history_event(&self, next_attempt_at: Option<Ts>) -> coatcheck_core::EventKind {
        use coatcheck_core::EventKind;
        if self.delivered {
            EventKind::ReplyDelivered {
                target: "webhook".into(),
                attempt: self.attempt,
                http_status: self.http_status,
            }
        } else {
            EventKind::ReplyDeliveryFailed {
                target: "webhook".into(),
                attempt: self.attempt,
                http_status: self.http_status,
                message: self.message.clone(),
                next_attempt_at,
            }
        }
    }
}

/// `channel_receive` params.
#[derive(Debug, Clone)]
pub struct ChannelReceiveParams {
    /// The tenant owning the channel.
    pub tenant: String,
    /// The channel.
    pub channel: String,
    /// At most this many messages.
    pub max: u32,
    /// Each received message is hidden this long, then delivered again
    /// unless acknowledged.
    pub visibility: Duration,
    /// Now.
    pub now: Ts,
}

/// A webhook delivery due for an attempt.
#[derive(Debug, Clone)]
pub struct WebhookDelivery {
    /// The reply message id (the `webhook-id`).
    pub message_id: String,
    /// The request it answers.
    pub request_id: String,
    /// Where to POST.
    pub url: String,
    /// The JSON body to POST (the reply message), as stored.
    pub body: String,
    /// The attempt about to be made (1-based).
    pub attempt: u32,
    /// When the delivery was created (its first attempt's due time).
    pub created_at: Ts,
}

/// The outcome of one webhook attempt.
#[derive(Debug, Clone)]
pub struct WebhookOutcome {
    /// The reply message id.
    pub message_id: String,
    /// The attempt made.
    pub attempt: u32,
    /// The receiver answered 2xx.
    pub delivered: bool,
    /// The HTTP status, if the receiver answered.
    pub http_status: Option<u16>,
    /// What went wrong (empty when delivered).
    pub message: String,
    /// When to try again; `None` gives up (schedule exhausted, 410 Gone).
    pub next_attempt_at: Option<Ts>,
    /// Now.
    pub now: Ts,
}

/// `request_list` params. Newest first (by id, which sorts by creation).
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    /// Only this tenant's (None: all).
    pub tenant: Option<String>,
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this status.
    pub status: Option<Status>,
    /// Only this correlation id.
    pub correlation_id: Option<String>,
    /// Only ids strictly less than this (the page cursor).
    pub before_id: Option<String>,
    /// At most this many.
    pub limit: u32,
}

/// The earliest times at which background work is due. Lease expiries and
/// deadlines already past are reported too (the work is overdue: run it now);
/// `run_after` only counts times still in the future.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DueTimes {
    /// The earliest lease expiry of a running request.
    pub lease_expiry: Option<Ts>,
    /// The earliest deadline of an unfinished request.
    pub deadline: Option<Ts>,
    /// The earliest `run_after` of a queued request still in the future.
    pub run_after: Option<Ts>,
    /// The earliest time a received, unacknowledged channel message becomes
    /// visible again (in the future).
    pub channel_visible: Option<Ts>,
    /// The earliest due webhook attempt (overdue included).
    pub webhook: Option<Ts>,
}

/// Counts for one queue.
#[derive(Debug, Clone, Default)]
pub struct QueueCounts {
    /// The queue.
    pub queue: String,
    /// Requests by status (missing statuses are zero).
    pub counts: Vec<(Status, u64)>,
    /// Creation (or `run_after`) time of the oldest claimable queued request.
    pub oldest_ready: Option<Ts>,
}

impl QueueCounts {
    /// Adds one row of a store's kept counts (rows ordered by queue) to
    /// `out`; a status this version does not know is skipped.
    pub fn add_row(out: &mut Vec<QueueCounts>, queue: String, status: &str, n: i64) {
        let Some(status) = Status::parse(status) else {
            return;
        };
        if out.last().is_none_or(|q| q.queue != queue) {
            out.push(QueueCounts {
                queue,
                ..Default::default()
            });
        }
        if let Some(q) = out.last_mut() {
            q.counts.push((status, n.max(0) as u64));
        }
    }
}

/// Changes to the requests per queue and status that a store has yet to
/// write with its transaction (stores keep these counts as requests change,
/// so [`Store::queue_stats`] need not count the table).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CountChanges(Vec<(String, Status, i64)>);

impl CountChanges {
    /// `queue` has `by` more (or, negative, fewer) requests in `status`.
    pub fn add(&mut self, queue: &str, status: Status, by: i64) {
        match self
            .0
            .iter_mut()
            .find(|(q, s, _)| *s == status && q == queue)
        {
            Some((_, _, n)) => *n += by,
            None => self.0.push((queue.to_string(), status, by)),
        }
    }

    /// A request of `queue` went from `was` to `is` (nothing if the same).
    pub fn moved(&mut self, queue: &str, was: Status, is: Status) {
        if was != is {
            self.add(queue, was, -1);
            self.add(queue, is, 1);
        }
    }

    /// Takes the changes that are not zero, leaving none.
    pub fn take(&mut self) -> Vec<(String, Status, i64)> {
        let mut out = std::mem::take(&mut self.0);
        out.retain(|(_, _, n)| *n != 0);
        out
    }

    /// Forgets every change (their transaction was rolled back).
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

/// Configuration every store honours.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// The retry policy for failed attempts.
    pub retry: RetryPolicy,
}

/// A change made by another process sharing the store (another node on the
/// same PostgreSQL), for the local notifier and timers.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteChange {
    /// A request changed.
    Request {
        /// Its id.
        id: String,
        /// Its queue.
        queue: String,
        /// Its new status.
        status: Status,
        /// When its lease runs out, if running.
        lease_expires_at: Option<Ts>,
        /// When it becomes claimable, if queued for later.
        run_after: Option<Ts>,
        /// Its deadline, if unfinished.
        deadline: Option<Ts>,
    },
    /// A reply was appended to a channel: its receivers may have messages.
    Channel {
        /// The tenant owning the channel.
        tenant: String,
        /// The channel.
        channel: String,
    },
    /// A webhook delivery is due at this time.
    Webhook {
        /// When.
        due: Ts,
    },
    /// Changes may have been missed (the listening connection was lost and
    /// re-established): every waiter and timer must re-check.
    Resync,
}

/// The storage seam. Methods in alphabetical order; all are cancel-safe in
/// the sense that a write either commits whole or not at all.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The earliest times background work is due (see [`DueTimes`]).
    async fn due_times(&self, now: Ts) -> Result<DueTimes>;

    /// Redrive: a `failed`, `cancelled` or `expired` request back to `queued`.
    async fn dead_letter_redrive(&self, r: RequestRef, now: Ts) -> Result<Changed>;

    /// Expires unfinished requests whose deadline is `<= now`, at most `limit`.
    async fn deadline_expire_due(&self, now: Ts, limit: u32) -> Result<Vec<Changed>>;

    /// Renews a lease and records progress.
    async fn lease_heartbeat(&self, p: HeartbeatParams) -> Result<Changed>;

    /// Requeues (or dead-letters) running requests whose lease ran out by
    /// `now`, at most `limit`.
    async fn lease_expire_due(&self, now: Ts, limit: u32) -> Result<Vec<Changed>>;

    /// Retention: deletes up to `limit` requests that finished before
    /// `finished_before` — the request, its history, its idempotency key and
    /// its settled webhook deliveries — and answers how many. Unfinished
    /// requests are never touched. Callers loop until it answers less than
    /// `limit`.
    async fn request_purge(&self, finished_before: Ts, limit: u32) -> Result<u64>;

    /// How many requests of a queue are `queued` (its depth, for limits).
    async fn queue_depth(&self, queue: &str) -> Result<u64> {
        let stats = self.queue_stats(chrono::Utc::now()).await?;
        Ok(stats
            .iter()
            .find(|q| q.queue == queue)
            .and_then(|q| q.counts.iter().find(|(s, _)| *s == Status::Queued))
            .map(|(_, n)| *n)
            .unwrap_or(0))
    }

    /// Counts by queue and status.
    async fn queue_stats(&self, now: Ts) -> Result<Vec<QueueCounts>>;

    /// Acknowledges received channel messages: each token whose message is
    /// still hidden under it at `now` removes the message for good (`true`);
    /// a token whose visibility ran out is stale (`false`): the message
    /// stays and is (or will be) delivered again.
    async fn channel_ack(
        &self,
        tenant: String,
        channel: String,
        tokens: Vec<String>,
        now: Ts,
    ) -> Result<Vec<bool>>;

    /// Deletes channel messages created before `before` (retention of
    /// unacknowledged replies), at most `limit`; answers how many.
    async fn channel_purge(&self, before: Ts, limit: u32) -> Result<u64>;

    /// Receives up to `max` visible messages of a channel, oldest first,
    /// hiding each for `visibility` under a fresh ack token.
    async fn channel_receive(
        &self,
        p: ChannelReceiveParams,
    ) -> Result<Vec<coatcheck_core::wire::ChannelMessage>>;

    /// Cancel: queued → cancelled; running → cancel requested.
    async fn request_cancel(&self, r: RequestRef, now: Ts) -> Result<(CancelOutcome, Changed)>;

    /// Claims up to `max` claimable requests of a queue: highest priority
    /// first; within a priority, rotating across fairness keys per
    /// [`FairnessRules`]; within a key, oldest first. Each comes back
    /// `running` under a fresh lease. No request
    /// is ever leased twice at once, however many claims run concurrently.
    async fn request_claim(&self, p: ClaimParams) -> Result<Vec<Request>>;

    /// One request.
    async fn request_get(&self, r: RequestRef) -> Result<Request>;

    /// A request's history after `after_seq` (0: all), oldest first.
    async fn request_history(&self, r: RequestRef, after_seq: u64) -> Result<Vec<HistoryEvent>>;

    /// A page of requests, newest first.
    async fn request_list(&self, p: ListParams) -> Result<Vec<Request>>;

    /// Completes or fails many running requests in one commit; each item's
    /// outcome is independent of the others'.
    async fn request_settle_many(
        &self,
        items: Vec<SettleParams>,
        now: Ts,
    ) -> Result<Vec<Result<Changed>>>;

    /// Stores a new request durably (or finds it by idempotency key).
    async fn request_submit(&self, p: SubmitParams) -> Result<Submitted>;

    /// [`Store::request_submit`] for a caller that holds back its answer
    /// anyway (a submit with `Prefer: wait` answers when the request
    /// finishes): the store may answer before the request is on disk and
    /// leave the flush to a later durable change — the completion's own
    /// flush covers the submit. It then answers a **mark**, and the caller
    /// must not acknowledge the request (nor reveal it as stored) before
    /// [`Store::sync_through`] with that mark has returned. `None`: durable
    /// already. The default is [`Store::request_submit`], durable at once.
    async fn request_submit_unsynced(&self, p: SubmitParams) -> Result<(Submitted, Option<u64>)> {
        Ok((self.request_submit(p).await?, None))
    }

    /// Returns once every change made before `mark` (from
    /// [`Store::request_submit_unsynced`]) is durable, flushing if no flush
    /// covered it yet. At once when a flush already did (the usual case: the
    /// request's completion was flushed before its waiter woke).
    async fn sync_through(&self, mark: u64) -> Result<()> {
        let _ = mark;
        Ok(())
    }

    /// Flushes this store made to make commits durable, if it counts them
    /// (the embedded store does; a database server flushes on its own).
    fn flushes(&self) -> Option<u64> {
        None
    }

    /// Takes up to `limit` webhook deliveries due at `now`, leasing each for
    /// `lease` (so no other node attempts it meanwhile; if this node dies the
    /// attempt is made again after the lease).
    async fn webhook_claim_due(
        &self,
        now: Ts,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<WebhookDelivery>>;

    /// Records a webhook attempt: the delivery's new state, and a
    /// `reply_delivered` / `reply_delivery_failed` event in the request's history.
    async fn webhook_record(&self, o: WebhookOutcome) -> Result<()>;

    /// Stops accepting work, finishes what is pending, releases resources.
    async fn store_close(&self);

    /// Whether the store answers.
    async fn store_ping(&self) -> Result<()>;

    /// A named server secret (e.g. the key that signs page tokens): the
    /// stored bytes, or — the first time — a fresh random 32-byte secret,
    /// persisted. Every caller gets the same bytes: concurrent first calls
    /// (also from other nodes sharing the store) agree on one secret, and it
    /// survives restarts.
    async fn store_secret(&self, name: &str) -> Result<Vec<u8>>;

    /// Changes made by *other* processes sharing this store, as they happen.
    /// A store only one process can open (the embedded one) has none.
    fn remote_changes(&self) -> Option<tokio::sync::broadcast::Receiver<RemoteChange>> {
        None
    }

    /// Registers `wake`, which the store may call with a queue's name as soon
    /// as a submit that makes work claimable there is *committed* — before
    /// the submit's own answer, which waits for durability. So a waiting
    /// claim starts while the fsync is still in flight. (Claiming a request
    /// whose submit is not yet acknowledged is harmless: a power cut takes
    /// back both, and the worker's outcome for it is then refused.) A store
    /// that does not do this leaves it to the answer's own wake-up.
    fn on_claimable(&self, wake: QueueWaker) {
        let _ = wake;
    }

    /// Claims like [`Store::request_claim`], but when nothing is claimable
    /// the claim stays with the store, **parked**, and is answered by the
    /// very transaction that makes work claimable in its queue (a submit, a
    /// retry, a redrive, a requeued lease): the work is handed over in that
    /// commit, with no wake-up and second claim in between. The answer
    /// comes once, with requests — or, after [`ParkHandle::unpark`], with
    /// whatever it got by then (possibly nothing). Dropping the answer's
    /// receiver abandons the claim. `None`: this store cannot park (the
    /// caller waits for wake-ups and claims again).
    fn request_claim_parked(&self, p: ClaimParams) -> Option<ParkedClaim> {
        let _ = p;
        None
    }
}

/// See [`Store::on_claimable`].
pub type QueueWaker = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// A claim parked in the store ([`Store::request_claim_parked`]).
pub struct ParkedClaim {
    /// The claim's one answer.
    pub answer: tokio::sync::oneshot::Receiver<Result<Vec<Request>>>,
    /// Tells the store about the claim while it waits.
    pub handle: Box<dyn ParkHandle>,
}

/// What the waiting side of a parked claim can tell the store.
pub trait ParkHandle: Send + Sync {
    /// Look at the queue again at `now` (the caller was woken by something
    /// the store may not see itself: a delayed request came due, the clock
    /// moved).
    fn poke(&self, now: Ts);
    /// Stop waiting: answer at once with what the claim got (nothing, if it
    /// was not handed work before this).
    fn unpark(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_changes_net_out_per_queue_and_status() {
        let mut c = CountChanges::default();
        c.add("a", Status::Queued, 1);
        c.add("a", Status::Queued, 1);
        c.moved("a", Status::Queued, Status::Running);
        c.moved("a", Status::Running, Status::Running);
        c.moved("b", Status::Running, Status::Succeeded);
        c.moved("a", Status::Running, Status::Queued);
        assert_eq!(
            c.take(),
            vec![
                ("a".to_string(), Status::Queued, 2),
                ("b".to_string(), Status::Running, -1),
                ("b".to_string(), Status::Succeeded, 1),
            ],
            "a's running went up and down again: left out"
        );
        assert_eq!(c.take(), vec![], "taken: nothing is left");
    }
}
