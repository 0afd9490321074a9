//! The Request resource and its state machine's states.
//!
//! `docs/state-machine.md` draws every edge; [`crate::rules`] implements them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use chrono::{DateTime, Utc};

/// Where a request is in its life.
///
/// ```text
/// queued ──claim──▶ running ──complete──▶ succeeded
///   ▲  │              │ │ └─fail/lease expiry (no attempts left)──▶ failed
///   │  │              │ └──fail/lease expiry (attempts left)──▶ queued
///   │  └─cancel──▶ cancelled ◀──fail/lease expiry after cancel_requested
///   └──── redrive ◀── failed | cancelled | expired ◀── deadline passed (queued or running)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting to be claimed. Enters on submit, on a retryable failure or lease
    /// expiry with attempts left, and on redrive. Leaves by claim (to
    /// `running`), cancel (to `cancelled`) or deadline (to `expired`).
    Queued,
    /// Leased to one worker. Enters by claim. Leaves by complete, fail, lease
    /// expiry, deadline, or the worker giving up after a cancel request.
    Running,
    /// Terminal: a worker completed it; `output` is set.
    Succeeded,
    /// Terminal, the dead-letter set: attempts used up, or the worker said the
    /// failure is not retryable. An operator may redrive it.
    Failed,
    /// Terminal: cancelled by the client while queued, or while running once
    /// the worker gave up.
    Cancelled,
    /// Terminal: its deadline passed before it finished.
    Expired,
}

impl Status {
    /// Every status, in life order.
    pub const ALL: [Status; 6] = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
        Status::Expired,
    ];

    /// Whether the request will never change again (except by redrive).
    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Queued | Status::Running)
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Expired => "expired",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request failed, was cancelled or expired.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorInfo {
    /// A short machine-readable code, e.g. `timeout`, `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 128, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$")
    )]
    pub code: Option<String>,
    /// A human-readable message.
    #[cfg_attr(feature = "openapi", schema(max_length = 65536))]
    pub message: String,
    /// Anything else the worker wanted to say, as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
    pub details: Option<serde_json::Value>,
}

impl ErrorInfo {
    /// An error with a code and a message.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ErrorInfo {
            code: Some(code.to_string()),
            message: message.into(),
            details: None,
        }
    }
}

/// A webhook target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookTarget {
    /// Where the reply message is POSTed.
    pub url: String,
}

/// The return address of a request: where its reply goes when it is terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReplyTo {
    /// `{"channel": "name"}`: appended to a durable reply channel.
    Channel(String),
    /// `{"webhook": {"url": "https://..."}}`: POSTed, signed.
    Webhook(WebhookTarget),
}

/// The lease a running request is held under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The fencing token a worker must present.
    pub token: String,
    /// Who holds it.
    pub worker_id: String,
    /// When it runs out.
    pub expires_at: DateTime<Utc>,
    /// The length of the lease as claimed, in milliseconds; a heartbeat
    /// without `extend` renews by this much.
    pub duration_ms: u64,
}

/// A request: the wire resource of API.md plus the server's private fields
/// (tenant, lease, history counter, idempotency), which never serialize.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Request {
    /// Opaque id chosen by the server (UUIDv7 text).
    pub id: String,
    /// The queue (request channel) it was submitted to.
    pub queue: String,
    /// Where it is in its life.
    pub status: Status,
    /// The client's own correlation id, echoed everywhere.
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// The input as the client sent it.
    #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
    pub input: Box<RawValue>,
    /// The output, once succeeded.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
    pub output: Option<Box<RawValue>>,
    /// Why it failed, was cancelled or expired.
    #[serde(default)]
    pub error: Option<ErrorInfo>,
    /// The last progress a worker reported.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
    pub progress: Option<Box<RawValue>>,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// Attempts started so far.
    #[serde(default)]
    pub attempts: u32,
    /// Attempts allowed before it is dead-lettered.
    pub max_attempts: u32,
    /// The client asked to cancel while it was running.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The return address.
    #[serde(default)]
    pub reply_to: Option<ReplyTo>,
    /// The client's own string → string bookkeeping.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// On dead-letter, the same input is submitted to this queue.
    #[serde(default)]
    pub fallback_queue: Option<String>,
    /// The request this one is the fallback of.
    #[serde(default)]
    pub fallback_of: Option<String>,
    /// The fallback request created when this one dead-lettered.
    #[serde(default)]
    pub fallback_request_id: Option<String>,
    /// Claims rotate across fairness keys (default: the tenant).
    #[serde(default)]
    pub fairness_key: String,
    /// When it was submitted.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Not claimed before this time (delay, retry backoff).
    #[serde(default)]
    pub run_after: Option<DateTime<Utc>>,
    /// Expires if not finished by then.
    #[serde(default)]
    pub deadline: Option<DateTime<Utc>>,
    /// When it reached a terminal state.
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,

    /// The tenant that owns it (private).
    #[serde(skip)]
    pub tenant: String,
    /// The current lease while running (private).
    #[serde(skip)]
    pub lease: Option<Lease>,
    /// The token of the last lease, kept after it ends so that a repeated
    /// complete with it is idempotent (private).
    #[serde(skip)]
    pub last_lease_token: Option<String>,
    /// The sequence number of the last history event (private).
    #[serde(skip)]
    pub history_seq: u64,
}

impl Request {
    /// Whether `token` is the live lease at `now`.
    pub fn lease_is(&self, token: &str, now: DateTime<Utc>) -> bool {
        self.status == Status::Running
            && self
                .lease
                .as_ref()
                .is_some_and(|l| l.token == token && l.expires_at > now)
    }

    /// Whether the outputs of two requests are the same JSON text.
    pub fn same_output(a: Option<&RawValue>, b: Option<&RawValue>) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => a.get() == b.get(),
            _ => false,
        }
    }
}

/// A fresh request id: UUIDv7 text (sortable, unique across nodes).
pub fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A fresh, unguessable lease token.
pub fn new_lease_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
