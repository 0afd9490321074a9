//! What a worker's handler gets and returns: [`Job`] (typed input, the
//! request's identity, progress reporting, the cancellation token) and
//! [`HandlerError`] (retryable or not, `retry_after`, an error code).
//!
//! Key decisions:
//! - Progress is "latest wins": reporting only stores the value and wakes the
//!   job's heartbeat task, which sends it promptly (at most every 250 ms), so a
//!   handler can report in a tight loop without flooding the server.
//! - `HandlerError` converts from any `std::error::Error` (so `?` works in a
//!   handler) as a *retryable* failure — the server's default too. Say
//!   [`HandlerError::fatal`] for failures another attempt cannot fix.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coatcheck_core::wire::ClaimedRequest;
use coatcheck_core::{ErrorInfo, Ts};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// State one claimed request shares between its handler, its heartbeat task
/// and the runtime.
#[derive(Debug)]
pub(crate) struct JobShared {
    pub id: String,
    pub lease_token: String,
    /// The latest progress not yet sent.
    pub progress: Mutex<Option<Box<RawValue>>>,
    /// Wakes the heartbeat task when progress is reported.
    pub progress_wake: Notify,
    /// Fires on `cancel_requested` or a lost lease.
    pub cancel: CancellationToken,
    /// A heartbeat was refused (409/404): the lease is someone else's now.
    pub lost: AtomicBool,
    /// The outcome is being or has been reported; progress is moot.
    pub finished: AtomicBool,
}

impl JobShared {
    pub fn new(claimed: &ClaimedRequest) -> Self {
        JobShared {
            id: claimed.id.clone(),
            lease_token: claimed.lease_token.clone(),
            progress: Mutex::new(None),
            progress_wake: Notify::new(),
            cancel: CancellationToken::new(),
            lost: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        }
    }

    fn report(&self, value: &impl Serialize) {
        if self.finished.load(Ordering::Acquire) {
            return;
        }
        // A value that does not serialize cannot be sent; progress is
        // best-effort, so it is dropped rather than failing the job.
        let Ok(raw) = serde_json::value::to_raw_value(value) else {
            return;
        };
        if let Ok(mut slot) = self.progress.lock() {
            *slot = Some(raw);
        }
        self.progress_wake.notify_one();
    }
}

/// One claimed request, handed to a worker's handler.
#[derive(Debug)]
pub struct Job<T> {
    /// The request's input, deserialized.
    pub input: T,
    pub(crate) queue: String,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) correlation_id: Option<String>,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) deadline: Option<Ts>,
    pub(crate) shared: Arc<JobShared>,
}

impl<T> Job<T> {
    pub(crate) fn new(input: T, claimed: ClaimedRequest, shared: Arc<JobShared>) -> Self {
        Job {
            input,
            queue: claimed.queue,
            attempt: claimed.attempt,
            max_attempts: claimed.max_attempts,
            correlation_id: claimed.correlation_id,
            metadata: claimed.metadata,
            deadline: claimed.deadline,
            shared,
        }
    }

    /// The request id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The queue it was claimed from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Which attempt this is (1-based).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Attempts allowed in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether a retryable failure now would dead-letter the request.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }

    /// The client's correlation id.
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// The client's metadata.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The request's deadline, if any: it expires if not finished by then.
    pub fn deadline(&self) -> Option<Ts> {
        self.deadline
    }

    /// Reports progress (any JSON). Sent promptly with a heartbeat; if
    /// reported faster than it can be sent, only the latest value goes out.
    pub fn progress(&self, value: impl Serialize) {
        self.shared.report(&value);
    }

    /// A handle for reporting progress from elsewhere (another task, a
    /// blocking thread); cheap to clone.
    pub fn progress_handle(&self) -> ProgressHandle {
        ProgressHandle {
            shared: self.shared.clone(),
        }
    }

    /// A token that fires when the client cancelled the request
    /// (`cancel_requested` on a heartbeat), or when the lease was lost so
    /// that the work can no longer be reported. A handler should stop and
    /// return an error; the server then records the request `cancelled`.
    /// (Returning `Ok` instead completes it: first to finish wins.)
    pub fn cancelled(&self) -> CancellationToken {
        self.shared.cancel.clone()
    }

    /// Whether [`Job::cancelled`] has fired.
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// The input, consuming the job.
    pub fn into_input(self) -> T {
        self.input
    }
}

/// Reports progress for one job; see [`Job::progress_handle`].
#[derive(Debug, Clone)]
pub struct ProgressHandle {
    shared: Arc<JobShared>,
}

impl ProgressHandle {
    /// Reports progress, like [`Job::progress`]. After the job finished, does nothing.
    pub fn report(&self, value: impl Serialize) {
        self.shared.report(&value);
    }
}

/// Why a handler did not produce an output.
#[derive(Debug, Clone)]
pub struct HandlerError {
    pub(crate) message: String,
    pub(crate) code: Option<String>,
    pub(crate) retryable: bool,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) details: Option<serde_json::Value>,
}

impl HandlerError {
    /// A failure another attempt may fix: the request goes back to the queue
    /// (after the server's backoff) while attempts are left.
    pub fn retryable(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            code: None,
            retryable: true,
            retry_after: None,
            details: None,
        }
    }

    /// A failure no retry can fix (bad input, …): the request is dead-lettered
    /// (`failed`) at once.
    pub fn fatal(message: impl Into<String>) -> Self {
        HandlerError {
            retryable: false,
            ..HandlerError::retryable(message)
        }
    }

    /// For a retryable failure: the next attempt no sooner than this.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// A short machine-readable code (stored in the request's `error.code`).
    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Extra JSON stored in the request's `error.details` (dropped if it
    /// does not serialize).
    pub fn details(mut self, details: impl Serialize) -> Self {
        self.details = serde_json::to_value(&details).ok();
        self
    }

    /// Whether another attempt may help.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn error_info(&self) -> ErrorInfo {
        ErrorInfo {
            code: self.code.clone(),
            message: self.message.clone(),
            details: self.details.clone(),
        }
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.retryable { "retryable" } else { "fatal" };
        match &self.code {
            Some(code) => write!(f, "{kind} [{code}]: {}", self.message),
            None => write!(f, "{kind}: {}", self.message),
        }
    }
}

/// Any error becomes a retryable failure with its message (and its sources').
impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        HandlerError::retryable(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_errors() {
        let e = HandlerError::retryable("busy")
            .retry_after(Duration::from_millis(300))
            .code("busy")
            .details(serde_json::json!({"n": 1}));
        assert!(e.is_retryable());
        assert_eq!(e.retry_after, Some(Duration::from_millis(300)));
        let info = e.error_info();
        assert_eq!(info.code.as_deref(), Some("busy"));
        assert_eq!(info.details.unwrap(), serde_json::json!({"n": 1}));
        assert_eq!(e.to_string(), "retryable [busy]: busy");

        let f = HandlerError::fatal("bad input");
        assert!(!f.is_retryable());
        assert_eq!(f.to_string(), "fatal: bad input");

        fn parse(s: &str) -> Result<u32, HandlerError> {
            Ok(s.parse::<u32>()?)
        }
        let e = parse("x").unwrap_err();
        assert!(e.is_retryable());
        assert!(e.message().contains("invalid digit"));
    }

    #[test]
    fn progress_keeps_the_latest_value() {
        let claimed: ClaimedRequest = serde_json::from_value(serde_json::json!({
            "id": "r1", "queue": "q", "input": {"a": 1}, "attempt": 1, "max_attempts": 3,
            "lease_token": "t", "lease_expires_at": "2030-01-01T00:00:00Z",
            "deadline": null, "correlation_id": "c", "metadata": {"k": "v"}
        }))
        .unwrap();
        let shared = Arc::new(JobShared::new(&claimed));
        let job = Job::new(7u32, claimed, shared.clone());
        assert_eq!(job.id(), "r1");
        assert_eq!(job.correlation_id(), Some("c"));
        assert_eq!(job.metadata().get("k").map(String::as_str), Some("v"));
        assert!(!job.is_last_attempt());
        job.progress(serde_json::json!({"pct": 10}));
        job.progress_handle().report(serde_json::json!({"pct": 20}));
        assert_eq!(
            shared.progress.lock().unwrap().as_ref().unwrap().get(),
            r#"{"pct":20}"#
        );
        shared.finished.store(true, Ordering::Release);
        *shared.progress.lock().unwrap() = None;
        job.progress(1);
        assert!(shared.progress.lock().unwrap().is_none());
        assert!(!job.is_cancelled());
        shared.cancel.cancel();
        assert!(job.cancelled().is_cancelled());
        assert_eq!(job.into_input(), 7);
    }
}
