//! Every transition of a request, as a pure function.
//!
//! A store loads the request, calls one of these with `now`, and persists the
//! mutated request together with the returned history events — in one
//! transaction. Nothing else may change a request's status. The functions
//! check their own preconditions and leave the request untouched on error.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::value::RawValue;

use crate::clock::{add, Ts};
use crate::history::{EventKind, HistoryEvent};
use crate::model::{ErrorInfo, Lease, ReplyTo, Request, Status};
use crate::retry::RetryPolicy;

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// The request is not in a state that allows this.
    #[error("the request is {status}")]
    WrongState {
        /// Its status.
        status: Status,
    },
    /// The lease token is not the request's live lease (expired, re-claimed,
    /// or the request is terminal): fencing.
    #[error("the lease token is not the current lease of this request")]
    LeaseLost {
        /// The request's status.
        status: Status,
    },
}

/// Everything needed to create a request.
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// The new id.
    pub id: String,
    /// The owning tenant.
    pub tenant: String,
    /// The queue.
    pub queue: String,
    /// The input bytes as received.
    pub input: Box<RawValue>,
    /// The client's correlation id.
    pub correlation_id: Option<String>,
    /// Higher runs first.
    pub priority: i32,
    /// Not claimable before `now + delay`.
    pub delay: Option<Duration>,
    /// Expires at `now + timeout`.
    pub timeout: Option<Duration>,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The return address.
    pub reply_to: Option<ReplyTo>,
    /// String → string bookkeeping.
    pub metadata: BTreeMap<String, String>,
    /// On dead-letter, resubmit here.
    pub fallback_queue: Option<String>,
    /// The request this is the fallback of.
    pub fallback_of: Option<String>,
    /// Claims rotate across these; defaults to the tenant.
    pub fairness_key: Option<String>,
}

fn push(req: &mut Request, now: Ts, kind: EventKind, out: &mut Vec<HistoryEvent>) {
    req.history_seq += 1;
    req.updated_at = now;
    out.push(HistoryEvent {
        seq: req.history_seq,
        at: now,
        kind,
    });
}

fn finish(req: &mut Request, status: Status, now: Ts) {
    req.status = status;
    req.finished_at = Some(now);
    req.run_after = None;
    if let Some(lease) = req.lease.take() {
        req.last_lease_token = Some(lease.token);
    }
}

fn check_lease(req: &Request, token: &str, now: Ts) -> Result<(), RuleError> {
    if req.lease_is(token, now) {
        Ok(())
    } else {
        Err(RuleError::LeaseLost { status: req.status })
    }
}

/// Submit: a new `queued` request and its `submitted` event.
pub fn submit(new: NewRequest, now: Ts) -> (Request, Vec<HistoryEvent>) {
    let run_after = new.delay.filter(|d| !d.is_zero()).map(|d| add(now, d));
    let fairness_key = new.fairness_key.unwrap_or_else(|| new.tenant.clone());
    let mut req = Request {
        id: new.id,
        queue: new.queue.clone(),
        status: Status::Queued,
        correlation_id: new.correlation_id,
        input: new.input,
        output: None,
        error: None,
        progress: None,
        priority: new.priority,
        attempts: 0,
        max_attempts: new.max_attempts.max(1),
        cancel_requested: false,
        reply_to: new.reply_to,
        metadata: new.metadata,
        fallback_queue: new.fallback_queue,
        fallback_of: new.fallback_of,
        fallback_request_id: None,
        fairness_key,
        created_at: now,
        updated_at: now,
        run_after,
        deadline: new.timeout.map(|t| add(now, t)),
        finished_at: None,
        tenant: new.tenant,
        lease: None,
        last_lease_token: None,
        history_seq: 0,
    };
    let mut out = Vec::with_capacity(1);
    push(
        &mut req,
        now,
        EventKind::Submitted {
            queue: new.queue,
            run_after,
        },
        &mut out,
    );
    if let Some(of) = req.fallback_of.clone() {
        push(
            &mut req,
            now,
            EventKind::FallbackOf { request_id: of },
            &mut out,
        );
    }
    (req, out)
}

/// Whether a claim at `now` may take this request.
pub fn claimable(req: &Request, now: Ts) -> bool {
    req.status == Status::Queued
        && req.run_after.is_none_or(|t| t <= now)
        && req.deadline.is_none_or(|d| d > now)
        && req.attempts < req.max_attempts
}

/// Claim: `queued` → `running` under a new lease; counts an attempt.
pub fn claim(
    req: &mut Request,
    worker_id: &str,
    lease: Duration,
    token: String,
    now: Ts,
) -> Result<Vec<HistoryEvent>, RuleError> {
    if !claimable(req, now) {
        return Err(RuleError::WrongState { status: req.status });
    }
    let expires_at = add(now, lease);
    req.status = Status::Running;
    req.attempts += 1;
    req.run_after = None;
    req.lease = Some(Lease {
        token,
        worker_id: worker_id.to_string(),
        expires_at,
        duration_ms: lease.as_millis().min(u64::MAX as u128) as u64,
    });
    let mut out = Vec::with_capacity(1);
    let kind = EventKind::Claimed {
        worker_id: worker_id.to_string(),
        attempt: req.attempts,
        lease_expires_at: expires_at,
    };
    push(req, now, kind, &mut out);
    Ok(out)
}

/// Heartbeat: renews the live lease (by `extend`, or by the lease's own
/// length) and records progress if given.
pub fn heartbeat(
    req: &mut Request,
    token: &str,
    progress: Option<Box<RawValue>>,
    extend: Option<Duration>,
    now: Ts,
) -> Result<Vec<HistoryEvent>, RuleError> {
    check_lease(req, token, now)?;
    let lease = req.lease.as_mut().expect("checked: running with a lease");
    let by = extend.unwrap_or(Duration::from_millis(lease.duration_ms));
    lease.expires_at = add(now, by);
    req.updated_at = now;
    let mut out = Vec::new();
    if let Some(progress) = progress {
        let value = serde_json::from_str(progress.get()).unwrap_or(serde_json::Value::Null);
        req.progress = Some(progress);
        push(req, now, EventKind::Progress { progress: value }, &mut out);
    }
    Ok(out)
}

/// Complete: `running` → `succeeded` with the output. Repeating it with the
/// token that completed it changes nothing and succeeds.
pub fn complete(
    req: &mut Request,
    token: &str,
    output: Box<RawValue>,
    now: Ts,
) -> Result<Vec<HistoryEvent>, RuleError> {
    if req.status == Status::Succeeded && req.last_lease_token.as_deref() == Some(token) {
        return Ok(Vec::new());
    }
    check_lease(req, token, now)?;
    finish(req, Status::Succeeded, now);
    req.output = Some(output);
    req.error = None;
    let mut out = Vec::with_capacity(1);
    push(
        req,
        now,
        EventKind::Succeeded {
            attempt: req.attempts,
        },
        &mut out,
    );
    Ok(out)
}

/// Fail: the worker gave up on this attempt. With a cancel requested the
/// request ends `cancelled`; retryable with attempts left it goes back to
/// `queued` after a backoff (or `retry_after`); otherwise it is dead-lettered
/// as `failed`. `r` is a random number in `[0, 1)` for jitter.
#[allow(clippy::too_many_arguments)]
pub fn fail(
    req: &mut Request,
    token: &str,
    error: ErrorInfo,
    retryable: bool,
    retry_after: Option<Duration>,
    policy: &RetryPolicy,
    r: f64,
    now: Ts,
) -> Result<Vec<HistoryEvent>, RuleError> {
    check_lease(req, token, now)?;
    let mut out = Vec::with_capacity(1);
    if req.cancel_requested {
        finish(req, Status::Cancelled, now);
        req.error = Some(cancelled_error());
        push(req, now, EventKind::Cancelled, &mut out);
    } else if retryable && req.attempts < req.max_attempts {
        let delay = retry_after.unwrap_or_else(|| policy.delay(req.attempts, r));
        let run_after = add(now, delay);
        if let Some(lease) = req.lease.take() {
            req.last_lease_token = Some(lease.token);
        }
        req.status = Status::Queued;
        req.run_after = Some(run_after);
        req.error = Some(error.clone());
        let kind = EventKind::AttemptFailed {
            attempt: req.attempts,
            error,
            run_after,
        };
        push(req, now, kind, &mut out);
    } else {
        finish(req, Status::Failed, now);
        req.error = Some(error.clone());
        push(
            req,
            now,
            EventKind::Failed {
                attempt: req.attempts,
                error,
            },
            &mut out,
        );
    }
    Ok(out)
}

/// Whether the lease of a running request has run out at `now`.
pub fn lease_expired(req: &Request, now: Ts) -> bool {
    req.status == Status::Running && req.lease.as_ref().is_some_and(|l| l.expires_at <= now)
}

/// Lease expiry: the worker went silent. Back to `queued` with attempts left,
/// `cancelled` if a cancel was requested, else dead-lettered as `failed`.
pub fn expire_lease(req: &mut Request, now: Ts) -> Result<Vec<HistoryEvent>, RuleError> {
    if !lease_expired(req, now) {
        return Err(RuleError::WrongState { status: req.status });
    }
    let worker_id = req
        .lease
        .as_ref()
        .map(|l| l.worker_id.clone())
        .unwrap_or_default();
    let attempt = req.attempts;
    let next_status = if req.cancel_requested {
        finish(req, Status::Cancelled, now);
        req.error = Some(cancelled_error());
        Status::Cancelled
    } else if req.attempts < req.max_attempts {
        if let Some(lease) = req.lease.take() {
            req.last_lease_token = Some(lease.token);
        }
        req.status = Status::Queued;
        req.run_after = None;
        Status::Queued
    } else {
        finish(req, Status::Failed, now);
        req.error = Some(ErrorInfo::new(
            "lease_expired",
            format!("the lease of attempt {attempt} ran out and no attempts are left"),
        ));
        Status::Failed
    };
    let mut out = Vec::with_capacity(2);
    push(
        req,
        now,
        EventKind::LeaseExpired {
            worker_id,
            attempt,
            next_status,
        },
        &mut out,
    );
    match next_status {
        Status::Cancelled => push(req, now, EventKind::Cancelled, &mut out),
        Status::Failed => {
            let error = req.error.clone().expect("set above");
            push(req, now, EventKind::Failed { attempt, error }, &mut out)
        }
        _ => {}
    }
    Ok(out)
}

/// Whether a request's deadline has passed while it is not finished.
pub fn deadline_passed(req: &Request, now: Ts) -> bool {
    !req.status.is_terminal() && req.deadline.is_some_and(|d| d <= now)
}

/// Deadline: a queued or running request whose deadline passed → `expired`.
pub fn expire_deadline(req: &mut Request, now: Ts) -> Result<Vec<HistoryEvent>, RuleError> {
    if !deadline_passed(req, now) {
        return Err(RuleError::WrongState { status: req.status });
    }
    let from = req.status;
    finish(req, Status::Expired, now);
    req.error = Some(ErrorInfo::new(
        "deadline_exceeded",
        "the request did not finish before its deadline",
    ));
    let mut out = Vec::with_capacity(1);
    push(req, now, EventKind::Expired { from }, &mut out);
    Ok(out)
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued and is now `cancelled`.
    Cancelled,
    /// It is running; `cancel_requested` is set and the worker will learn it.
    Requested,
}

/// Cancel: queued → `cancelled` at once; running → `cancel_requested`;
/// terminal → refused.
pub fn cancel(req: &mut Request, now: Ts) -> Result<(CancelOutcome, Vec<HistoryEvent>), RuleError> {
    let mut out = Vec::with_capacity(1);
    match req.status {
        Status::Queued => {
            finish(req, Status::Cancelled, now);
            req.error = Some(cancelled_error());
            push(req, now, EventKind::Cancelled, &mut out);
            Ok((CancelOutcome::Cancelled, out))
        }
        Status::Running => {
            if !req.cancel_requested {
                req.cancel_requested = true;
                push(req, now, EventKind::CancelRequested, &mut out);
            }
            Ok((CancelOutcome::Requested, out))
        }
        status => Err(RuleError::WrongState { status }),
    }
}

/// Redrive: a `failed`, `cancelled` or `expired` request goes back to `queued`
/// with fresh attempts, no progress, and no fallback link (the old link
/// stays in its history). A deadline that has already passed is dropped (it
/// would expire the request again at once).
pub fn redrive(req: &mut Request, now: Ts) -> Result<Vec<HistoryEvent>, RuleError> {
    let from = req.status;
    if !matches!(from, Status::Failed | Status::Cancelled | Status::Expired) {
        return Err(RuleError::WrongState { status: from });
    }
    req.status = Status::Queued;
    req.attempts = 0;
    req.error = None;
    req.output = None;
    req.cancel_requested = false;
    req.finished_at = None;
    req.run_after = None;
    req.progress = None;
    // A fresh run: it may fall back again, and it sends its own reply.
    req.fallback_request_id = None;
    if req.deadline.is_some_and(|d| d <= now) {
        req.deadline = None;
    }
    let mut out = Vec::with_capacity(1);
    push(req, now, EventKind::Redriven { from }, &mut out);
    Ok(out)
}

/// For a request that just dead-lettered with a `fallback_queue`: the
/// fallback request to submit (same input, correlation id, reply_to,
/// metadata), and the `fallback_submitted` event recorded on the first one.
/// `None` if it has no fallback queue or already has a fallback.
pub fn fallback(
    req: &mut Request,
    new_id: String,
    now: Ts,
) -> Option<(NewRequest, Vec<HistoryEvent>)> {
    if req.status != Status::Failed || req.fallback_request_id.is_some() {
        return None;
    }
    let queue = req.fallback_queue.clone()?;
    let new = NewRequest {
        id: new_id.clone(),
        tenant: req.tenant.clone(),
        queue: queue.clone(),
        input: req.input.clone(),
        correlation_id: req.correlation_id.clone(),
        priority: req.priority,
        delay: None,
        timeout: None,
        max_attempts: req.max_attempts,
        reply_to: req.reply_to.clone(),
        metadata: req.metadata.clone(),
        fallback_queue: None,
        fallback_of: Some(req.id.clone()),
        fairness_key: Some(req.fairness_key.clone()),
    };
    req.fallback_request_id = Some(new_id.clone());
    let mut out = Vec::with_capacity(1);
    push(
        req,
        now,
        EventKind::FallbackSubmitted {
            fallback_request_id: new_id,
            queue,
        },
        &mut out,
    );
    Some((new, out))
}

/// Whether a terminal request's reply should go out: it has a return address
/// and is the last request of its chain (a request handed to a fallback
/// leaves the reply to the fallback).
pub fn reply_due(req: &Request) -> bool {
    req.status.is_terminal() && req.reply_to.is_some() && req.fallback_request_id.is_none()
}

/// Where a reply goes, and what it says.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The return address.
    pub to: ReplyTo,
    /// The message.
    pub message: crate::wire::ReplyMessage,
}

/// For a transition that just produced `events`: the reply to send if the
/// request just became terminal with a return address (and is the last of
/// its chain). A channel reply counts as delivered when it is appended, so
/// its `reply_delivered` event is recorded here, in the same transaction; a
/// webhook's events come with each delivery attempt.
pub fn reply(req: &mut Request, events: &mut Vec<HistoryEvent>, now: Ts) -> Option<Reply> {
    let terminal_now = events.iter().any(|e| {
        matches!(
            e.kind,
            EventKind::Succeeded { .. }
                | EventKind::Failed { .. }
                | EventKind::Cancelled
                | EventKind::Expired { .. }
        )
    });
    if !terminal_now || !reply_due(req) {
        return None;
    }
    let to = req.reply_to.clone()?;
    let message = crate::wire::ReplyMessage {
        message_id: crate::model::new_request_id(),
        request_id: req.id.clone(),
        correlation_id: req.correlation_id.clone(),
        queue: req.queue.clone(),
        status: req.status,
        output: req.output.clone(),
        error: req.error.clone(),
        finished_at: req.finished_at,
    };
    if let ReplyTo::Channel(_) = &to {
        let kind = EventKind::ReplyDelivered {
            target: "channel".into(),
            attempt: 1,
            http_status: None,
        };
        push(req, now, kind, events);
    }
    Some(Reply { to, message })
}

/// Records an event that changes nothing but the history (reply delivery
/// attempts).
pub fn record(req: &mut Request, kind: EventKind, now: Ts) -> Vec<HistoryEvent> {
    let updated = req.updated_at;
    let mut out = Vec::with_capacity(1);
    push(req, now, kind, &mut out);
    req.updated_at = updated;
    out
}

fn cancelled_error() -> ErrorInfo {
    ErrorInfo::new("cancelled", "the request was cancelled by the client")
}

#[cfg(test)]
mod tests;
