//! Reporting outcomes (complete / fail) so that none is lost: one settler task
//! per worker that batches what finished at the same time and retries what
//! could not be sent.
//!
//! Key decisions:
//! - Natural batching, no timer: the settler sends whatever is waiting the
//!   moment it is free; while that call is in flight new outcomes queue up and
//!   go together in the next call (`POST …/settlements`, up to 100 items and
//!   ~256 KiB), with `Prefer: return=minimal` so the answer carries each
//!   request's new status but not the request (nor its output) back. A lone
//!   outcome uses the plain `complete`/`fail` call. So a quiet worker pays no
//!   latency and a busy one pays one round trip per batch.
//! - An outcome is retried with the *same lease token* until it lands (200),
//!   is refused for good (409/404: the lease is gone, or a repeated fail whose
//!   first answer was lost), or the worker gives up at the end of shutdown.
//!   Complete is idempotent with the current token, so a repeat is harmless.
//! - A complete refused with 400/413 (an output the server will never take,
//!   e.g. over its body limit) is reported as a non-retryable fail with code
//!   `output_rejected` instead of being dropped.
//! - If the server does not offer the batch call (404/405/501 for the whole
//!   call), the settler falls back to single calls for the rest of its life.

use std::sync::Arc;

use coatcheck_core::wire::{FailBody, SettlementItem, SettlementResult};
use coatcheck_core::Status;
use futures::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Ctx, WorkerEvent};
use crate::backoff::Backoff;
use crate::error::{synthetic_problem, Error};

/// Most items in one settlements call (the API's limit).
const MAX_ITEMS: usize = 100;
/// Rough byte budget of one settlements call, well under the server's
/// default 1 MiB body limit.
const MAX_BYTES: usize = 256 * 1024;

/// What became of one outcome.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Recorded; the request's status after it (if the server said).
    Settled(Option<Status>),
    /// Refused for good (409/404).
    Rejected(Error),
    /// Not delivered: a permanent error, or the worker stopped trying.
    GaveUp(Error),
}

struct Pending {
    item: SettlementItem,
    reply: oneshot::Sender<Outcome>,
}

impl Pending {
    fn size(&self) -> usize {
        let i = &self.item;
        256 + i.output.as_ref().map_or(0, |o| o.get().len())
            + i.error.as_ref().map_or(0, |e| {
                e.message.len() + e.details.as_ref().map_or(0, |d| d.to_string().len())
            })
    }

    fn answer(self, outcome: Outcome) {
        let _ = self.reply.send(outcome);
    }
}

/// The handle jobs use to report outcomes.
#[derive(Clone)]
pub(crate) struct Settler {
    tx: mpsc::UnboundedSender<Pending>,
}

impl Settler {
    /// Starts the settler task.
    pub fn spawn(ctx: Arc<Ctx>) -> (Settler, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Settler { tx }, tokio::spawn(run(ctx, rx)))
    }

    /// Reports `item` and waits until it landed, was refused or given up.
    pub async fn settle(&self, item: SettlementItem) -> Outcome {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Pending { item, reply }).is_err() {
            return Outcome::GaveUp(Error::Invalid("the worker's settler has stopped".into()));
        }
        rx.await.unwrap_or_else(|_| {
            Outcome::GaveUp(Error::Invalid("the worker's settler has stopped".into()))
        })
    }
}

async fn run(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut batch_call = true;
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = first.size();
        let mut batch = vec![first];
        while batch.len() < MAX_ITEMS {
            match rx.try_recv() {
                Ok(p) if bytes + p.size() > MAX_BYTES => {
                    carry = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.size();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        if batch.len() == 1 || !batch_call {
            join_all(batch.into_iter().map(|p| settle_one(&ctx, p))).await;
        } else {
            settle_batch(&ctx, batch, &mut batch_call).await;
        }
    }
}

async fn settle_batch(ctx: &Ctx, batch: Vec<Pending>, batch_call: &mut bool) {
    let items: Vec<SettlementItem> = batch.iter().map(|p| p.item.clone()).collect();
    let mut failures = 0u32;
    loop {
        let answer = tokio::select! {
            r = ctx.client.settle_minimal(&ctx.queue, items.clone()) => r,
            _ = ctx.give_up.cancelled() => {
                for p in batch {
                    p.answer(Outcome::GaveUp(Error::Timeout));
                }
                return;
            }
        };
        match answer {
            Ok(results) => {
                for (p, r) in batch.into_iter().zip(results) {
                    p.answer(outcome_of(r));
                }
                return;
            }
            Err(error) if error.is_transient() => {
                ctx.emit(WorkerEvent::SettleFailed {
                    ids: items.iter().map(|i| i.id.clone()).collect(),
                    error,
                });
                let pause = Backoff::WORKER.jittered(failures);
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = ctx.give_up.cancelled() => {}
                }
            }
            Err(error) => {
                // The call as a whole was refused (or answered nonsense):
                // each item on its own decides.
                if matches!(error.status(), Some(404 | 405 | 501)) {
                    *batch_call = false;
                }
                join_all(batch.into_iter().map(|p| settle_one(ctx, p))).await;
                return;
            }
        }
    }
}

fn outcome_of(r: SettlementResult) -> Outcome {
    match r.status {
        200..=299 => Outcome::Settled(r.request_status.or(r.request.map(|req| req.status))),
        status => {
            let problem = r.problem.unwrap_or_else(|| {
                synthetic_problem(status, format!("settlement of {} refused", r.id))
            });
            let error = Error::Api { status, problem };
            if error.is_conflict() || error.is_not_found() {
                Outcome::Rejected(error)
            } else {
                Outcome::GaveUp(error)
            }
        }
    }
}

async fn settle_one(ctx: &Ctx, p: Pending) {
    let Pending { mut item, reply } = p;
    let mut failures = 0u32;
    let outcome = loop {
        let call = async {
            match &item.output {
                Some(output) => {
                    ctx.client
                        .complete(&item.id, &item.lease_token, output)
                        .await
                }
                None => {
                    let body = FailBody {
                        lease_token: item.lease_token.clone(),
                        error: item.error.clone().unwrap_or_else(|| {
                            coatcheck_core::ErrorInfo::new("unknown", "no error given")
                        }),
                        retryable: item.retryable,
                        retry_after: item.retry_after,
                    };
                    ctx.client.fail(&item.id, body).await
                }
            }
        };
        let answer = tokio::select! {
            r = call => r,
            _ = ctx.give_up.cancelled() => break Outcome::GaveUp(Error::Timeout),
        };
        match answer {
            Ok(req) => break Outcome::Settled(Some(req.status)),
            Err(e) if e.is_conflict() || e.is_not_found() => break Outcome::Rejected(e),
            Err(e) if item.output.is_some() && matches!(e.status(), Some(400 | 413)) => {
                // The server will never take this output (too large, …):
                // fail the attempt for good rather than leave the request to
                // run into its lease again and again.
                item = rejected_output(item, &e);
            }
            Err(error) if error.is_transient() => {
                ctx.emit(WorkerEvent::SettleFailed {
                    ids: vec![item.id.clone()],
                    error,
                });
                let pause = Backoff::WORKER.jittered(failures);
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = ctx.give_up.cancelled() => {}
                }
            }
            Err(e) => break Outcome::GaveUp(e),
        }
    };
    let _ = reply.send(outcome);
}

/// The fail to report instead of a complete whose output was refused.
fn rejected_output(item: SettlementItem, refusal: &Error) -> SettlementItem {
    let why = refusal
        .problem()
        .map_or_else(|| refusal.to_string(), |p| p.detail.clone());
    SettlementItem {
        output: None,
        error: Some(coatcheck_core::ErrorInfo::new(
            "output_rejected",
            format!("the server refused the output: {why}"),
        )),
        retryable: Some(false),
        retry_after: None,
        ..item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_of_results() {
        let ok: SettlementResult =
            serde_json::from_value(serde_json::json!({"id": "a", "status": 200})).unwrap();
        assert!(matches!(outcome_of(ok), Outcome::Settled(None)));
        let conflict: SettlementResult = serde_json::from_value(serde_json::json!({
            "id": "a", "status": 409,
            "problem": {"type": "t", "title": "Conflict", "status": 409, "detail": "stale lease"}
        }))
        .unwrap();
        match outcome_of(conflict) {
            Outcome::Rejected(e) => assert_eq!(e.problem().unwrap().detail, "stale lease"),
            o => panic!("{o:?}"),
        }
        let gone: SettlementResult =
            serde_json::from_value(serde_json::json!({"id": "a", "status": 404})).unwrap();
        assert!(matches!(outcome_of(gone), Outcome::Rejected(e) if e.is_not_found()));
        let odd: SettlementResult =
            serde_json::from_value(serde_json::json!({"id": "a", "status": 400})).unwrap();
        assert!(matches!(outcome_of(odd), Outcome::GaveUp(_)));
    }
}
