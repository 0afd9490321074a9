//! The JSON bodies of the HTTP API (see API.md), shared by the server and the
//! SDK so that both sides agree by construction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::history::HistoryEvent;
use crate::model::{ErrorInfo, ReplyTo, Request, Status};
use chrono::{DateTime, Utc};

/// `POST /v1/queues/{queue}/requests`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubmitBody {
    /// Any JSON; stored and handed to the worker byte for byte.
    #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
    pub input: Box<RawValue>,
    /// The client's own correlation id, echoed in every reply (at most 256
    /// bytes, no control characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$")
    )]
    pub correlation_id: Option<String>,
    /// Higher runs first (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Seconds before it may be claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 315360000))]
    pub delay: Option<f64>,
    /// Seconds until its deadline; then it expires if not finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 315360000))]
    pub timeout: Option<f64>,
    /// Attempts before it is dead-lettered, 1..1000 (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1000))]
    pub max_attempts: Option<u32>,
    /// The return address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyTo>,
    /// String → string bookkeeping (at most 64 entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// On dead-letter, resubmit the same input to this queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    )]
    pub fallback_queue: Option<String>,
    /// Claims rotate across fairness keys (default: the tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 128, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$")
    )]
    pub fairness_key: Option<String>,
}

/// `POST /v1/queues/{queue}/claims`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimBody {
    /// Who is claiming (for history and debugging).
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 256,
            pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"
        )
    )]
    pub worker_id: String,
    /// At most this many requests, 1..100 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100))]
    pub max: Option<u32>,
    /// Lease length in seconds, at least 1 ms (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0.001, maximum = 315360000))]
    pub lease: Option<f64>,
    /// Long-poll up to this many seconds for work (default 0; a wait above
    /// the server's cap is clamped to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub wait: Option<f64>,
}

/// One claimed request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimedRequest {
    /// The request id.
    pub id: String,
    /// Its queue.
    pub queue: String,
    /// Its input, as submitted.
    #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
    pub input: Box<RawValue>,
    /// Which attempt this is (1-based).
    pub attempt: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// The fencing token for heartbeat, complete and fail.
    pub lease_token: String,
    /// When the lease runs out unless renewed.
    pub lease_expires_at: DateTime<Utc>,
    /// The request's deadline, if any.
    pub deadline: Option<DateTime<Utc>>,
    /// The client's correlation id.
    pub correlation_id: Option<String>,
    /// The client's metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl ClaimedRequest {
    /// The claim view of a request just claimed.
    pub fn from_request(req: &Request) -> Option<ClaimedRequest> {
        let lease = req.lease.as_ref()?;
        Some(ClaimedRequest {
            id: req.id.clone(),
            queue: req.queue.clone(),
            input: req.input.clone(),
            attempt: req.attempts,
            max_attempts: req.max_attempts,
            lease_token: lease.token.clone(),
            lease_expires_at: lease.expires_at,
            deadline: req.deadline,
            correlation_id: req.correlation_id.clone(),
            metadata: req.metadata.clone(),
        })
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimResponse {
    /// Possibly empty after `wait`.
    pub requests: Vec<ClaimedRequest>,
}

/// `POST /v1/requests/{id}/heartbeat`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatBody {
    /// The lease token from the claim.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub lease_token: String,
    /// Progress to record, any JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
    pub progress: Option<Box<RawValue>>,
    /// Renew the lease to now + this many seconds (default: the lease's length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0.001, maximum = 315360000))]
    pub extend: Option<f64>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    /// The renewed lease end.
    pub lease_expires_at: DateTime<Utc>,
    /// The client asked to cancel: stop and call `fail`.
    pub cancel_requested: bool,
}

/// `POST /v1/requests/{id}/complete`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompleteBody {
    /// The lease token from the claim.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub lease_token: String,
    /// The output, any JSON (default null).
    #[serde(default = "json_null")]
    #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
    pub output: Box<RawValue>,
}

/// `POST /v1/requests/{id}/fail`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailBody {
    /// The lease token from the claim.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub lease_token: String,
    /// What went wrong.
    pub error: ErrorInfo,
    /// Whether another attempt may help (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// Seconds before the next attempt (default: the backoff policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 315360000))]
    pub retry_after: Option<f64>,
}

/// One item of `POST /v1/queues/{queue}/settlements`: a complete (with
/// `output`) or a fail (with `error`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SettlementItem {
    /// The request id.
    pub id: String,
    /// The lease token from the claim.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub lease_token: String,
    /// Set for a complete: any JSON, `null` included (an absent `output` is
    /// not a `null` one).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
    pub output: Option<Box<RawValue>>,
    /// Set for a fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// For a fail: whether another attempt may help (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// For a fail: seconds before the next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 315360000))]
    pub retry_after: Option<f64>,
}

/// A field that is there — `null` included — is `Some`; only an absent one
/// (with `#[serde(default)]`) is `None`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// `POST /v1/queues/{queue}/settlements`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SettlementsBody {
    /// 1..100 items.
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 100))]
    pub items: Vec<SettlementItem>,
}

/// The outcome of one settlement item, in request order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SettlementResult {
    /// The request id.
    pub id: String,
    /// 200, 409 or 404 — what the single call would have answered.
    pub status: u16,
    /// The request after the settlement (200), unless the call asked for
    /// `Prefer: return=minimal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Request>,
    /// The request's status after the settlement (200): `succeeded`,
    /// `queued` (a retry), `failed`, `cancelled`. Also under
    /// `Prefer: return=minimal`, where it is all that is said of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_status: Option<crate::Status>,
    /// The problem document (409/404).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

/// The answer to a settlements call.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SettlementsResponse {
    /// One per item, same order.
    pub items: Vec<SettlementResult>,
}

/// `GET /v1/requests`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListResponse {
    /// Newest first.
    pub requests: Vec<Request>,
    /// Pass as `page_token` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// `GET /v1/requests/{id}/history`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryResponse {
    /// Oldest first.
    pub events: Vec<HistoryEvent>,
}

/// One queue in `GET /v1/queues`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueInfo {
    /// The queue name.
    pub name: String,
    /// Requests by status (every status present, zero included).
    pub counts: BTreeMap<Status, u64>,
    /// Seconds the oldest claimable queued request has waited.
    pub oldest_queued_age: Option<f64>,
    /// Claims per second over the last minute, on this node.
    pub claim_rate: f64,
}

/// `GET /v1/queues`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueuesResponse {
    /// Every queue that has requests, by name.
    pub queues: Vec<QueueInfo>,
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub type_: String,
    /// A short summary of the type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong this time.
    pub detail: String,
    /// Extension members (e.g. `request_status`, `error`, `field`).
    #[serde(flatten)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

fn json_null() -> Box<RawValue> {
    RawValue::from_string("null".to_string()).expect("null is JSON")
}

/// The JSON `null` as a raw value.
pub fn null_raw() -> Box<RawValue> {
    json_null()
}

/// A reply message: what a request's return address receives when it is
/// terminal. `message_id` is stable across redeliveries, so receivers can
/// deduplicate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReplyMessage {
    /// Stable id of this message (also the webhook's `webhook-id`).
    pub message_id: String,
    /// The request it answers.
    pub request_id: String,
    /// The client's correlation id.
    pub correlation_id: Option<String>,
    /// The queue the request ran on (the last of a fallback chain).
    pub queue: String,
    /// The terminal status.
    pub status: Status,
    /// The output, when succeeded.
    #[cfg_attr(feature = "openapi", schema(value_type = serde_json::Value))]
    pub output: Option<Box<RawValue>>,
    /// The error, when failed, cancelled or expired.
    pub error: Option<ErrorInfo>,
    /// When the request finished.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One message received from a reply channel.
///
/// Fix: read through `ChannelMessageWire` — with `#[serde(flatten)]` serde
/// buffers the fields, and the raw `output` cannot be read back from that
/// buffer, so every message with an output failed to deserialize (the SDK's
/// channel consumer could not read what the server wrote).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "ChannelMessageWire")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChannelMessage {
    /// The reply message.
    #[serde(flatten)]
    pub message: ReplyMessage,
    /// Acknowledge with this token before the visibility timeout, or the
    /// message is delivered again.
    pub ack_token: String,
    /// How many times it has been delivered (1 the first time).
    pub delivery_count: u32,
}

/// The flat wire form of a [`ChannelMessage`], for reading it.
#[derive(Deserialize)]
struct ChannelMessageWire {
    message_id: String,
    request_id: String,
    #[serde(default)]
    correlation_id: Option<String>,
    queue: String,
    status: Status,
    #[serde(default)]
    output: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<ErrorInfo>,
    #[serde(default)]
    finished_at: Option<DateTime<Utc>>,
    ack_token: String,
    delivery_count: u32,
}

impl From<ChannelMessageWire> for ChannelMessage {
    fn from(w: ChannelMessageWire) -> Self {
        ChannelMessage {
            message: ReplyMessage {
                message_id: w.message_id,
                request_id: w.request_id,
                correlation_id: w.correlation_id,
                queue: w.queue,
                status: w.status,
                output: w.output,
                error: w.error,
                finished_at: w.finished_at,
            },
            ack_token: w.ack_token,
            delivery_count: w.delivery_count,
        }
    }
}

/// `GET /v1/channels/{name}/messages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChannelMessages {
    /// Possibly empty after `wait`.
    pub messages: Vec<ChannelMessage>,
}

/// `POST /v1/channels/{name}/ack`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AckBody {
    /// Tokens from received messages (1..1000).
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 1000))]
    pub ack_tokens: Vec<String>,
}

/// The answer to an ack.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AckResponse {
    /// Tokens whose messages are now removed for good.
    pub acked: Vec<String>,
    /// Tokens that match no message held under them (already acked, or
    /// their visibility ran out and the message was delivered again).
    pub not_found: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_messages_read_back_what_is_written() {
        let text = r#"{"messages":[{"message_id":"m","request_id":"r","correlation_id":"c","queue":"q","status":"succeeded","output":{"x": [1, 2]},"error":null,"finished_at":"2026-01-02T03:04:05.000006Z","ack_token":"t","delivery_count":2}]}"#;
        let got: ChannelMessages = serde_json::from_str(text).expect("reads");
        let m = &got.messages[0];
        assert_eq!(
            m.message.output.as_ref().map(|o| o.get()),
            Some(r#"{"x": [1, 2]}"#)
        );
        assert_eq!((m.ack_token.as_str(), m.delivery_count), ("t", 2));
        assert_eq!(m.message.correlation_id.as_deref(), Some("c"));
        let again = serde_json::to_string(&got).expect("writes");
        let back: ChannelMessages = serde_json::from_str(&again).expect("reads again");
        assert_eq!(serde_json::to_string(&back).unwrap(), again);
        let failed = r#"{"message_id":"m","request_id":"r","queue":"q","status":"failed","error":{"message":"x"},"ack_token":"t","delivery_count":1}"#;
        let m: ChannelMessage = serde_json::from_str(failed).expect("reads without output");
        assert!(m.message.output.is_none() && m.message.error.is_some());
    }
}
