//! A request's timeline: every change lands here, oldest first, numbered by a
//! per-request sequence (`seq`) that SSE uses as its event id.

use serde::{Deserialize, Serialize};

use crate::model::{ErrorInfo, Status};
use chrono::{DateTime, Utc};

/// One entry of a request's history.
///
/// Payloads inside events are `serde_json::Value`, not raw bytes: the
/// `kind` tag makes serde buffer the event, and raw values cannot be read
/// back from that buffer. History is not on the hot path.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryEvent {
    /// 1, 2, 3 … per request.
    pub seq: u64,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// What happened, with its details.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened. Serialized with a `kind` tag in snake_case.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// The request was accepted and stored.
    Submitted {
        /// The queue it went to.
        queue: String,
        /// Not claimable before this time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_after: Option<DateTime<Utc>>,
    },
    /// A worker claimed it.
    Claimed {
        /// The worker.
        worker_id: String,
        /// Which attempt this is (1-based).
        attempt: u32,
        /// When the lease runs out.
        lease_expires_at: DateTime<Utc>,
    },
    /// A worker reported progress.
    Progress {
        /// The progress JSON as the worker sent it.
        #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
        progress: serde_json::Value,
    },
    /// An attempt failed and the request was put back in the queue.
    AttemptFailed {
        /// The attempt that failed.
        attempt: u32,
        /// What the worker said.
        error: ErrorInfo,
        /// When it may run again.
        run_after: DateTime<Utc>,
    },
    /// A lease ran out without the worker completing or failing.
    LeaseExpired {
        /// The worker that held it.
        worker_id: String,
        /// The attempt it was.
        attempt: u32,
        /// Where the request went: `queued`, `failed` or `cancelled`.
        next_status: Status,
    },
    /// A worker completed it.
    Succeeded {
        /// The attempt that succeeded.
        attempt: u32,
    },
    /// It was dead-lettered.
    Failed {
        /// The last attempt.
        attempt: u32,
        /// Why.
        error: ErrorInfo,
    },
    /// The client asked to cancel it while running.
    CancelRequested,
    /// It was cancelled.
    Cancelled,
    /// Its deadline passed.
    Expired {
        /// The status it was in.
        from: Status,
    },
    /// An operator put it back in the queue with fresh attempts.
    Redriven {
        /// The terminal status it left.
        from: Status,
    },
    /// This request was submitted as the fallback of another that dead-lettered.
    FallbackOf {
        /// The request that dead-lettered.
        request_id: String,
    },
    /// On dead-letter, a fallback request was submitted.
    FallbackSubmitted {
        /// The new request.
        fallback_request_id: String,
        /// Its queue.
        queue: String,
    },
    /// Its reply was delivered.
    ReplyDelivered {
        /// `channel` or `webhook`.
        target: String,
        /// Delivery attempt (1-based).
        attempt: u32,
        /// HTTP status of a webhook answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        http_status: Option<u16>,
    },
    /// A delivery attempt failed.
    ReplyDeliveryFailed {
        /// `channel` or `webhook`.
        target: String,
        /// Delivery attempt (1-based).
        attempt: u32,
        /// HTTP status of a webhook answer, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        http_status: Option<u16>,
        /// What went wrong.
        message: String,
        /// When it is tried again, if it is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_attempt_at: Option<DateTime<Utc>>,
    },
}

impl EventKind {
    /// The wire name of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Submitted { .. } => "submitted",
            EventKind::Claimed { .. } => "claimed",
            EventKind::Progress { .. } => "progress",
            EventKind::AttemptFailed { .. } => "attempt_failed",
            EventKind::LeaseExpired { .. } => "lease_expired",
            EventKind::Succeeded { .. } => "succeeded",
            EventKind::Failed { .. } => "failed",
            EventKind::CancelRequested => "cancel_requested",
            EventKind::Cancelled => "cancelled",
            EventKind::Expired { .. } => "expired",
            EventKind::Redriven { .. } => "redriven",
            EventKind::FallbackOf { .. } => "fallback_of",
            EventKind::FallbackSubmitted { .. } => "fallback_submitted",
            EventKind::ReplyDelivered { .. } => "reply_delivered",
            EventKind::ReplyDeliveryFailed { .. } => "reply_delivery_failed",
        }
    }
}
