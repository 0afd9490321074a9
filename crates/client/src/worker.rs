//! The worker runtime: claims requests from a queue, runs a handler on each,
//! keeps their leases alive and reports their outcomes.
//!
//! ```no_run
//! # use coatcheck_client::{Client, Worker, Job, HandlerError};
//! # async fn demo() -> Result<(), coatcheck_client::Error> {
//! let client = Client::new("http://127.0.0.1:8080")?;
//! Worker::new(client, "echo")
//!     .concurrency(4)
//!     .run(|job: Job<serde_json::Value>| async move { Ok::<_, HandlerError>(job.input) },
//!          tokio::signal::ctrl_c())
//!     .await
//! # }
//! ```
//!
//! Key decisions:
//! - **Claims follow free capacity**: a claim asks for as many requests as
//!   there are free slots (up to 100) and long-polls (`wait`, default 30 s)
//!   for them, so an idle worker never busy-polls. With a concurrency of 4
//!   or more, two claims may be in flight at once, each for the slots free
//!   when it starts: slots that free up during one claim's round trip are
//!   claimed by the other instead of waiting for it.
//! - **Leases** are renewed by a heartbeat task per job at ~1/3 of the lease
//!   (`worker/lease.rs`); **outcomes** go through one settler task that
//!   batches and retries with the same lease token until they land
//!   (`worker/settle.rs`).
//! - **Unreachable server**: claims back off exponentially (200 ms … 10 s)
//!   and resume by themselves; heartbeats and outcomes retry likewise. Only a
//!   permanent refusal of the claim (400/401/403/…) stops the worker, with
//!   that error, after draining in-flight work.
//! - **Shutdown** (the future passed to [`Worker::run`] completes, or the
//!   token passed to [`Worker::run_until`] fires): stop claiming (an
//!   outstanding long-poll claim is dropped), let in-flight handlers finish
//!   within the grace period (default 30 s), then drop the ones still
//!   running and fail them retryable with `retry_after: 0` and code
//!   `worker_shutdown`, so they are claimable again at once (that attempt
//!   counts). Outcomes still undelivered 10 s later are given up; their
//!   leases run out on the server and the requests are retried there.
//! - **A handler panic** fails that attempt (retryable, code `panic`); the
//!   worker carries on. An input that does not deserialize into `T` fails
//!   the request for good (code `invalid_input`): another attempt cannot fix it.
//! - **Cancel**: a heartbeat answering `cancel_requested` fires the job's
//!   token ([`Job::cancelled`]); whatever the handler returns is reported —
//!   an error becomes a fail, which the server records as `cancelled`.
//! - Nothing is logged: register [`Worker::on_event`] to see what happens.

mod job;
mod lease;
mod settle;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coatcheck_core::wire::{ClaimBody, ClaimedRequest, SettlementItem};
use coatcheck_core::Status;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use job::{HandlerError, Job, ProgressHandle};

use crate::backoff::{secs, Backoff};
use crate::client::{check_queue, Client};
use crate::error::{Error, Result};
use job::JobShared;
use settle::{Outcome, Settler};

/// From this concurrency on, a worker keeps two claims in flight.
const CLAIM_LANES_FROM: usize = 4;

/// How long undelivered outcomes are retried after the grace period.
const FINAL_SETTLE: Duration = Duration::from_secs(10);

/// Something the worker runtime did or ran into; see [`Worker::on_event`].
#[derive(Debug)]
#[non_exhaustive]
pub enum WorkerEvent {
    /// A claim failed transiently; the worker retries after `retry_in`.
    ClaimFailed {
        /// What went wrong.
        error: Error,
        /// The backoff before the next claim.
        retry_in: Duration,
    },
    /// A heartbeat failed transiently; it is retried soon.
    HeartbeatFailed {
        /// The request.
        id: String,
        /// What went wrong.
        error: Error,
    },
    /// A heartbeat was refused: the lease expired or the request is terminal.
    /// The job's token fired and its outcome will not be reported.
    LeaseLost {
        /// The request.
        id: String,
    },
    /// Reporting outcomes failed transiently; they are retried.
    SettleFailed {
        /// The requests whose outcomes are waiting.
        ids: Vec<String>,
        /// What went wrong.
        error: Error,
    },
    /// An outcome landed.
    Settled {
        /// The request.
        id: String,
        /// Its status afterwards: `succeeded`, `queued` (retry), `failed`,
        /// `cancelled`, … (if the server said).
        status: Option<Status>,
    },
    /// An outcome was refused for good (409/404): the lease was no longer
    /// this worker's, or a repeated fail found the first one had landed.
    Rejected {
        /// The request.
        id: String,
        /// The server's answer.
        error: Error,
    },
    /// An outcome could not be delivered (a permanent error, or shutdown
    /// ended). The lease runs out on the server and the request is retried.
    GaveUp {
        /// The request.
        id: String,
        /// The last error.
        error: Error,
    },
    /// The handler panicked; the attempt is failed as retryable.
    Panicked {
        /// The request.
        id: String,
        /// The panic message.
        message: String,
    },
    /// The grace period ended with this handler still running; it was
    /// dropped and the attempt failed as retryable.
    Abandoned {
        /// The request.
        id: String,
    },
}

type EventFn = Arc<dyn Fn(&WorkerEvent) + Send + Sync>;

/// What every task of one running worker shares.
pub(crate) struct Ctx {
    pub client: Client,
    pub queue: String,
    pub lease: Duration,
    events: Option<EventFn>,
    /// Fires when the grace period is over: drop running handlers.
    pub hard_stop: CancellationToken,
    /// Fires when shutdown is over: stop retrying outcomes.
    pub give_up: CancellationToken,
}

impl Ctx {
    pub fn emit(&self, event: WorkerEvent) {
        if let Some(f) = &self.events {
            f(&event);
        }
    }
}

/// A worker for one queue; configure it, then [`Worker::run`] it.
#[derive(Clone)]
pub struct Worker {
    client: Client,
    queue: String,
    concurrency: usize,
    lease: Duration,
    worker_id: String,
    poll_wait: Duration,
    grace: Duration,
    events: Option<EventFn>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .field("concurrency", &self.concurrency)
            .field("lease", &self.lease)
            .field("worker_id", &self.worker_id)
            .field("poll_wait", &self.poll_wait)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker claiming from `queue`: one request at a time, 30 s leases.
    pub fn new(client: Client, queue: impl Into<String>) -> Self {
        Worker {
            client,
            queue: queue.into(),
            concurrency: 1,
            lease: Duration::from_secs(30),
            worker_id: default_worker_id(),
            poll_wait: Duration::from_secs(30),
            grace: Duration::from_secs(30),
            events: None,
        }
    }

    /// How many requests run at once (default 1; at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The lease to claim with (default 30 s); heartbeats renew it every
    /// third of it while the handler runs, so it bounds how long a crashed
    /// worker's requests wait, not how long a handler may run.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The worker id recorded in the requests' history (default
    /// `<hostname>-<pid>-<random>`).
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = id.into();
        self
    }

    /// How long one claim long-polls for work (default 30 s; the server
    /// caps it).
    pub fn poll_wait(mut self, wait: Duration) -> Self {
        self.poll_wait = wait;
        self
    }

    /// How long shutdown lets running handlers finish (default 30 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Calls `f` for every [`WorkerEvent`] (from the worker's tasks; keep it quick).
    pub fn on_event(mut self, f: impl Fn(&WorkerEvent) + Send + Sync + 'static) -> Self {
        self.events = Some(Arc::new(f));
        self
    }

    /// Runs `handler` on every claimed request until `shutdown` completes
    /// (e.g. `tokio::signal::ctrl_c()`), then shuts down gracefully (module
    /// docs). Returns `Ok` after a shutdown, or the error that stopped claims.
    ///
    /// `T` is the input type and `O` the output type; `serde_json::Value`
    /// works for both to handle raw JSON.
    pub async fn run<T, O, H, Fut, S>(self, handler: H, shutdown: S) -> Result<()>
    where
        T: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        H: Fn(Job<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<O, HandlerError>> + Send + 'static,
        S: Future,
    {
        let token = CancellationToken::new();
        let run = self.run_until(handler, token.clone());
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r,
            _ = shutdown => {
                token.cancel();
                run.await
            }
        }
    }

    /// [`Worker::run`] until `shutdown` is cancelled.
    pub async fn run_until<T, O, H, Fut>(
        self,
        handler: H,
        shutdown: CancellationToken,
    ) -> Result<()>
    where
        T: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        H: Fn(Job<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<O, HandlerError>> + Send + 'static,
    {
        check_queue(&self.queue)?;
        if self.lease.is_zero() {
            return Err(Error::Invalid("the lease must be longer than zero".into()));
        }
        let ctx = Arc::new(Ctx {
            client: self.client.clone(),
            queue: self.queue.clone(),
            lease: self.lease,
            events: self.events.clone(),
            hard_stop: CancellationToken::new(),
            give_up: CancellationToken::new(),
        });
        let (settler, settler_task) = Settler::spawn(ctx.clone());
        let tracker = TaskTracker::new();
        let spawn_job = {
            let (ctx, tracker, handler) = (ctx.clone(), tracker.clone(), Arc::new(handler));
            move |claimed: ClaimedRequest, permit: Option<OwnedSemaphorePermit>| {
                tracker.spawn(run_job(
                    ctx.clone(),
                    settler.clone(),
                    handler.clone(),
                    claimed,
                    permit,
                ));
            }
        };
        // Two claims in flight (with room for both): while one claim's
        // round trip is on the wire, slots freed meanwhile are claimed by
        // the other instead of waiting for it.
        let capacity = Arc::new(Semaphore::new(self.concurrency));
        let lanes = if self.concurrency >= CLAIM_LANES_FROM {
            2
        } else {
            1
        };
        let stopped = futures::future::try_join_all(
            (0..lanes).map(|_| self.claim_loop(&ctx, &shutdown, &spawn_job, capacity.clone())),
        )
        .await
        .map(|_| ());

        tracker.close();
        if tokio::time::timeout(self.grace, tracker.wait())
            .await
            .is_err()
        {
            ctx.hard_stop.cancel();
            if tokio::time::timeout(FINAL_SETTLE, tracker.wait())
                .await
                .is_err()
            {
                ctx.give_up.cancel();
                tracker.wait().await;
            }
        }
        settler_task.abort();
        stopped
    }

    /// Claims while there is capacity until shutdown or a permanent error.
    async fn claim_loop(
        &self,
        ctx: &Ctx,
        shutdown: &CancellationToken,
        spawn_job: &impl Fn(ClaimedRequest, Option<OwnedSemaphorePermit>),
        capacity: Arc<Semaphore>,
    ) -> Result<()> {
        let per_claim = self.concurrency.min(100);
        let mut failures = 0u32;
        let mut quick_empties = 0u32;
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                p = capacity.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let mut permits = vec![first];
            while permits.len() < per_claim {
                match capacity.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let body = ClaimBody {
                worker_id: self.worker_id.clone(),
                max: Some(permits.len() as u32),
                lease: Some(secs(self.lease)),
                wait: Some(secs(self.poll_wait)),
            };
            let started = Instant::now();
            let answer = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                r = ctx.client.claim(&ctx.queue, body) => r,
            };
            match answer {
                Ok(claimed) if claimed.is_empty() => {
                    failures = 0;
                    // An empty answer long before the wait was up (a race with
                    // another worker, or a server that does not long-poll):
                    // tolerate a few, then slow down rather than spin.
                    let quick = (self.poll_wait / 2).max(Duration::from_millis(100));
                    if started.elapsed() >= quick {
                        quick_empties = 0;
                        continue;
                    }
                    quick_empties += 1;
                    if quick_empties >= 3 {
                        let pause = Duration::from_millis(100 * u64::from(quick_empties.min(10)));
                        drop(permits);
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(pause) => {}
                        }
                    }
                }
                Ok(claimed) => {
                    failures = 0;
                    quick_empties = 0;
                    for c in claimed {
                        // More than asked for would be a server bug; run it anyway.
                        spawn_job(c, permits.pop());
                    }
                    // Let the jobs just spawned run first, and the settler
                    // after them (two turns of a single-threaded runtime):
                    // a quick handler's outcome then goes out before this
                    // lane's next claim. The outcome is on the request's
                    // critical path; the next claim is not. Measured: the
                    // sequential claimed → completed 0.03–0.06 ms shorter.
                    tokio::task::yield_now().await;
                    tokio::task::yield_now().await;
                }
                Err(error) if error.is_transient() => {
                    drop(permits);
                    let retry_in = Backoff::WORKER.jittered(failures);
                    failures = failures.saturating_add(1);
                    ctx.emit(WorkerEvent::ClaimFailed { error, retry_in });
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(retry_in) => {}
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// What to report for one job.
enum Decision {
    Complete(Box<RawValue>),
    Fail(HandlerError),
}

/// Runs one claimed request: handler, heartbeats, outcome.
async fn run_job<T, O, H, Fut>(
    ctx: Arc<Ctx>,
    settler: Settler,
    handler: Arc<H>,
    claimed: ClaimedRequest,
    permit: Option<OwnedSemaphorePermit>,
) where
    T: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    H: Fn(Job<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<O, HandlerError>> + Send + 'static,
{
    let shared = Arc::new(JobShared::new(&claimed));
    let heartbeat = AbortOnDrop(tokio::spawn(lease::heartbeat_loop(
        ctx.clone(),
        shared.clone(),
    )));
    let id = claimed.id.clone();

    let decision = match serde_json::from_str::<T>(claimed.input.get()) {
        Err(e) => Decision::Fail(
            HandlerError::fatal(format!(
                "the input does not fit the worker's input type: {e}"
            ))
            .code("invalid_input"),
        ),
        Ok(input) => {
            let job = Job::new(input, claimed, shared.clone());
            match std::panic::catch_unwind(AssertUnwindSafe(|| handler(job))) {
                Err(panic) => panicked(&ctx, &id, panic),
                Ok(fut) => tokio::select! {
                    biased;
                    r = AssertUnwindSafe(fut).catch_unwind() => match r {
                        Ok(Ok(output)) => match serde_json::value::to_raw_value(&output) {
                            Ok(raw) => Decision::Complete(raw),
                            Err(e) => Decision::Fail(
                                HandlerError::fatal(format!("the output does not serialize: {e}"))
                                    .code("invalid_output"),
                            ),
                        },
                        Ok(Err(e)) => Decision::Fail(e),
                        Err(panic) => panicked(&ctx, &id, panic),
                    },
                    _ = ctx.hard_stop.cancelled() => {
                        ctx.emit(WorkerEvent::Abandoned { id: id.clone() });
                        Decision::Fail(
                            HandlerError::retryable("worker shutting down")
                                .code("worker_shutdown")
                                .retry_after(Duration::ZERO),
                        )
                    }
                },
            }
        }
    };
    shared.finished.store(true, Ordering::Release);
    // The handler is done: its slot is free for the next claim while the
    // outcome is sent (settles are batched and retried on their own), so
    // claiming overlaps settling instead of waiting a round trip for it.
    drop(permit);
    if shared.lost.load(Ordering::Acquire) {
        // The lease is gone (LeaseLost was reported): nothing to settle.
        return;
    }
    let item = match decision {
        Decision::Complete(output) => SettlementItem {
            id: id.clone(),
            lease_token: shared.lease_token.clone(),
            output: Some(output),
            error: None,
            retryable: None,
            retry_after: None,
        },
        Decision::Fail(e) => SettlementItem {
            id: id.clone(),
            lease_token: shared.lease_token.clone(),
            output: None,
            error: Some(e.error_info()),
            retryable: Some(e.retryable),
            retry_after: e.retry_after.map(secs),
        },
    };
    let outcome = settler.settle(item).await;
    drop(heartbeat);
    ctx.emit(match outcome {
        Outcome::Settled(status) => WorkerEvent::Settled { id, status },
        Outcome::Rejected(error) => WorkerEvent::Rejected { id, error },
        Outcome::GaveUp(error) => WorkerEvent::GaveUp { id, error },
    });
}

fn panicked(ctx: &Ctx, id: &str, panic: Box<dyn std::any::Any + Send>) -> Decision {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_string());
    ctx.emit(WorkerEvent::Panicked {
        id: id.to_string(),
        message: message.clone(),
    });
    Decision::Fail(HandlerError::retryable(format!("handler panicked: {message}")).code("panic"))
}

/// Aborts a task when dropped (the job's heartbeat dies with the job).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty() && h.len() <= 64)
        .unwrap_or_else(|| "worker".to_string());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &rand[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_settings() {
        let client = Client::new("http://127.0.0.1:9").unwrap();
        let w = Worker::new(client, "q")
            .concurrency(0)
            .lease(Duration::from_secs(5))
            .worker_id("w1")
            .grace_period(Duration::from_secs(1));
        assert_eq!(w.concurrency, 1);
        assert_eq!(w.lease, Duration::from_secs(5));
        assert_eq!(w.worker_id, "w1");
        assert!(default_worker_id().split('-').count() >= 3);
    }

    #[tokio::test]
    async fn refuses_a_bad_queue_before_claiming() {
        let client = Client::new("http://127.0.0.1:9").unwrap();
        let err = Worker::new(client, "no/such")
            .run_until(
                |job: Job<serde_json::Value>| async move { Ok::<_, HandlerError>(job.input) },
                CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Invalid(_)));
    }

    #[tokio::test]
    async fn stops_on_shutdown_while_the_server_is_unreachable() {
        // Nothing listens on port 9 (discard): claims fail and back off; a
        // shutdown still ends the run promptly.
        let client = Client::builder("http://127.0.0.1:9")
            .retries(0)
            .build()
            .unwrap();
        let events = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = events.clone();
        let token = CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.cancel();
        });
        let started = Instant::now();
        Worker::new(client, "q")
            .on_event(move |e| {
                if matches!(e, WorkerEvent::ClaimFailed { .. }) {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            })
            .run_until(
                |job: Job<serde_json::Value>| async move { Ok::<_, HandlerError>(job.input) },
                token,
            )
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(events.load(Ordering::Relaxed) >= 1);
    }
}
