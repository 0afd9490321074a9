//! The worker side of the API: claims (long-poll), heartbeat, complete,
//! fail, and the batch settlements.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use coatcheck_core::validate::{self, Invalid};
use coatcheck_core::wire::{
    ClaimBody, ClaimResponse, ClaimedRequest, CompleteBody, FailBody, HeartbeatBody,
    HeartbeatResponse, SettlementResult, SettlementsBody, SettlementsResponse,
};
use coatcheck_core::{ErrorInfo, Request};
use coatcheck_store::{HeartbeatParams, RequestRef, SettleParams, Settlement};

use super::auth::Caller;
use super::extract::{JsonBody, Segment};
use super::problem::ApiError;
use super::requests::{prefer_minimal, request_ref, wait_duration, with_headers};
use crate::engine::Engine;
use crate::keys::Role;

/// The routes of this file.
pub fn router() -> Router<Arc<Engine>> {
    Router::new()
        .route("/v1/queues/{queue}/claims", post(claim))
        .route("/v1/queues/{queue}/settlements", post(settlements))
        .route("/v1/requests/{id}/heartbeat", post(heartbeat))
        .route("/v1/requests/{id}/complete", post(complete))
        .route("/v1/requests/{id}/fail", post(fail))
}

/// A request a worker key names: with a queue allowlist, a request on
/// another queue is not there (404).
async fn worker_request(
    engine: &Engine,
    caller: &Caller,
    id: String,
) -> Result<RequestRef, ApiError> {
    let r = request_ref(caller, id)?;
    if caller.queues.is_some() {
        let req = engine.get(r.clone()).await?;
        if !caller.may_use(&req.queue) {
            return Err(ApiError::not_found("the request"));
        }
    }
    Ok(r)
}

fn lease_token(t: &str) -> Result<(), Invalid> {
    if t.is_empty() || t.len() > 128 {
        return Err(Invalid::new(
            "lease_token",
            "must be a lease token from a claim",
        ));
    }
    Ok(())
}

fn error_info(e: &ErrorInfo) -> Result<(), Invalid> {
    // Messages may hold newlines (a stack trace); only the size matters.
    if e.message.len() > 64 * 1024 {
        return Err(Invalid::new("error.message", "must be at most 65536 bytes"));
    }
    if let Some(c) = &e.code {
        validate::text("error.code", c, 128)?;
    }
    Ok(())
}

fn fail_settlement(
    error: ErrorInfo,
    retryable: Option<bool>,
    retry_after: Option<f64>,
) -> Result<Settlement, ApiError> {
    error_info(&error)?;
    let retry_after = validate::opt_duration("retry_after", retry_after)?;
    Ok(Settlement::Fail {
        error,
        retryable: retryable.unwrap_or(true),
        retry_after,
    })
}

/// Claim up to `max` ready requests, long-polling up to `wait` seconds.
#[utoipa::path(post, path = "/v1/queues/{queue}/claims", tag = "worker", params(("queue" = String, Path, description = "A queue name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")),
    request_body = ClaimBody,
    responses((status = 200, body = ClaimResponse), (status = 400, body = coatcheck_core::wire::Problem)))]
pub async fn claim(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(queue): Segment,
    body: JsonBody<ClaimBody>,
) -> Result<Json<ClaimResponse>, ApiError> {
    caller.require(Role::Worker)?;
    caller.require_queue(&queue)?;
    let b = body.value;
    validate::name("queue", &queue)?;
    if b.worker_id.is_empty() {
        return Err(Invalid::new("worker_id", "must not be empty").into());
    }
    validate::text("worker_id", &b.worker_id, 256)?;
    let max = b.max.unwrap_or(1);
    if !(1..=100).contains(&max) {
        return Err(Invalid::new("max", "must be between 1 and 100").into());
    }
    let lease = match validate::opt_duration("lease", b.lease)? {
        Some(d) if d < Duration::from_millis(1) => {
            return Err(Invalid::new("lease", "must be more than 0 seconds").into())
        }
        Some(d) => d,
        None => engine.config.default_lease,
    };
    let wait = wait_duration(&engine, b.wait)?;
    let _permit = if wait.is_zero() {
        None
    } else {
        Some(engine.stream_permit(&caller)?)
    };
    let got = engine.claim(&queue, &b.worker_id, max, lease, wait).await?;
    let requests = got
        .iter()
        .filter_map(ClaimedRequest::from_request)
        .collect();
    Ok(Json(ClaimResponse { requests }))
}

/// Renew a lease, report progress, learn of a cancel request.
#[utoipa::path(post, path = "/v1/requests/{id}/heartbeat", tag = "worker", params(("id" = String, Path, description = "A request id")),
    request_body = HeartbeatBody,
    responses((status = 200, body = HeartbeatResponse), (status = 409, body = coatcheck_core::wire::Problem)))]
pub async fn heartbeat(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(id): Segment,
    body: JsonBody<HeartbeatBody>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    caller.require(Role::Worker)?;
    let r = worker_request(&engine, &caller, id).await?;
    let b = body.value;
    lease_token(&b.lease_token)?;
    let extend = match validate::opt_duration("extend", b.extend)? {
        Some(d) if d.is_zero() => {
            return Err(Invalid::new("extend", "must be more than 0 seconds").into())
        }
        other => other,
    };
    let req = engine
        .heartbeat(HeartbeatParams {
            id: r.id,
            lease_token: b.lease_token,
            progress: b.progress,
            extend,
            now: engine.now(),
        })
        .await?;
    let lease_expires_at = req
        .lease
        .as_ref()
        .map(|l| l.expires_at)
        .unwrap_or(req.updated_at);
    Ok(Json(HeartbeatResponse {
        lease_expires_at,
        cancel_requested: req.cancel_requested,
    }))
}

/// Complete a running request with its output (idempotent with the same token).
#[utoipa::path(post, path = "/v1/requests/{id}/complete", tag = "worker", params(("id" = String, Path, description = "A request id")),
    request_body = CompleteBody,
    responses((status = 200, body = Request), (status = 409, body = coatcheck_core::wire::Problem)))]
pub async fn complete(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(id): Segment,
    body: JsonBody<CompleteBody>,
) -> Result<Json<Request>, ApiError> {
    caller.require(Role::Worker)?;
    let r = worker_request(&engine, &caller, id).await?;
    let b = body.value;
    lease_token(&b.lease_token)?;
    let item = SettleParams {
        id: r.id,
        queue: None,
        lease_token: b.lease_token,
        settlement: Settlement::Complete { output: b.output },
    };
    Ok(Json(engine.settle(item).await?))
}

/// Fail an attempt: retry with backoff, dead-letter, or cancel if requested.
#[utoipa::path(post, path = "/v1/requests/{id}/fail", tag = "worker", params(("id" = String, Path, description = "A request id")),
    request_body = FailBody,
    responses((status = 200, body = Request), (status = 409, body = coatcheck_core::wire::Problem)))]
pub async fn fail(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(id): Segment,
    body: JsonBody<FailBody>,
) -> Result<Json<Request>, ApiError> {
    caller.require(Role::Worker)?;
    let r = worker_request(&engine, &caller, id).await?;
    let b = body.value;
    lease_token(&b.lease_token)?;
    let settlement = fail_settlement(b.error, b.retryable, b.retry_after)?;
    let item = SettleParams {
        id: r.id,
        queue: None,
        lease_token: b.lease_token,
        settlement,
    };
    Ok(Json(engine.settle(item).await?))
}

/// Complete and fail many requests in one durable commit.
#[utoipa::path(post, path = "/v1/queues/{queue}/settlements", tag = "worker", params(("queue" = String, Path, description = "A queue name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"),
        ("Prefer" = Option<String>, Header, description = "`return=minimal` (RFC 7240): leave each settled request out of its item; `request_status` still says where it went")),
    request_body = SettlementsBody,
    responses((status = 200, body = SettlementsResponse), (status = 400, body = coatcheck_core::wire::Problem)))]
pub async fn settlements(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(queue): Segment,
    headers: HeaderMap,
    body: JsonBody<SettlementsBody>,
) -> Result<Response, ApiError> {
    caller.require(Role::Worker)?;
    caller.require_queue(&queue)?;
    validate::name("queue", &queue)?;
    let minimal = prefer_minimal(&headers);
    let items = body.value.items;
    if items.is_empty() || items.len() > 100 {
        return Err(Invalid::new("items", "must hold 1 to 100 items").into());
    }
    // A malformed item refuses the whole batch (400); an id that names no
    // request of this queue is that item's 404.
    let mut slots: Vec<Result<usize, ApiError>> = Vec::with_capacity(items.len());
    let mut ids = Vec::with_capacity(items.len());
    let mut batch = Vec::with_capacity(items.len());
    for (i, it) in items.into_iter().enumerate() {
        ids.push(it.id.clone());
        lease_token(&it.lease_token).map_err(|e| {
            ApiError::from(Invalid::new(&format!("items[{i}].lease_token"), e.message))
        })?;
        let settlement = match (it.output, it.error) {
            (Some(output), None) => Settlement::Complete { output },
            (None, Some(error)) => fail_settlement(error, it.retryable, it.retry_after)?,
            _ => {
                return Err(Invalid::new(
                    &format!("items[{i}]"),
                    "must have exactly one of output or error",
                )
                .into())
            }
        };
        slots.push(request_ref(&caller, it.id).map(|r| {
            batch.push(SettleParams {
                id: r.id,
                queue: Some(queue.clone()),
                lease_token: it.lease_token,
                settlement,
            });
            batch.len() - 1
        }));
    }
    let mut results: Vec<Option<Result<Request, ApiError>>> = engine
        .settle_many(batch)
        .await?
        .into_iter()
        .map(|r| Some(r.map_err(ApiError::from)))
        .collect();
    let items = slots
        .into_iter()
        .zip(ids)
        .map(|(slot, id)| {
            let res = slot.and_then(|i| {
                results[i]
                    .take()
                    .unwrap_or_else(|| Err(ApiError::not_found("the request")))
            });
            match res {
                Ok(req) => SettlementResult {
                    id,
                    status: StatusCode::OK.as_u16(),
                    request_status: Some(req.status),
                    request: (!minimal).then_some(req),
                    problem: None,
                },
                Err(e) => SettlementResult {
                    id,
                    status: e.status().as_u16(),
                    request: None,
                    request_status: None,
                    problem: Some(e.problem()),
                },
            }
        })
        .collect();
    let resp = Json(SettlementsResponse { items }).into_response();
    Ok(if minimal {
        with_headers(
            resp,
            &[(
                HeaderName::from_static("preference-applied"),
                "return=minimal".into(),
            )],
        )
    } else {
        resp
    })
}
