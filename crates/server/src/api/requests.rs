//! The client side of the API: submit, status (long-poll), result, history,
//! cancel, list, redrive.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use coatcheck_core::rules::{CancelOutcome, NewRequest};
use coatcheck_core::validate::{self, Invalid};
use coatcheck_core::wire::{HistoryResponse, ListResponse, SubmitBody};
use coatcheck_core::{ReplyTo, Request, Status};
use coatcheck_store::{Idempotency, ListParams, RequestRef, SubmitParams, Submitted};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::auth::Caller;
use super::extract::{JsonBody, QueryParams, Segment};
use super::problem::ApiError;
use crate::engine::Engine;
use crate::keys::Role;

/// The routes of this file.
pub fn router() -> Router<Arc<Engine>> {
    Router::new()
        .route("/v1/queues/{queue}/requests", post(submit))
        .route("/v1/requests", get(list))
        .route("/v1/requests/{id}", get(status).delete(cancel))
        .route("/v1/requests/{id}/result", get(result))
        .route("/v1/requests/{id}/history", get(history))
        .route("/v1/requests/{id}/redrive", post(redrive))
}

/// Seconds a client should wait before polling again.
const POLL_AFTER: &str = "1";

/// A request id from the path; anything that is not an id we issue is 404.
pub fn request_ref(caller: &Caller, id: String) -> Result<RequestRef, ApiError> {
    if !validate::request_id(&id) {
        return Err(ApiError::not_found("the request").with("id_malformed", true));
    }
    Ok(RequestRef {
        id,
        tenant: caller.scope(),
    })
}

fn location(id: &str) -> String {
    format!("/v1/requests/{id}")
}

pub(crate) fn with_headers(mut resp: Response, headers: &[(HeaderName, String)]) -> Response {
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            resp.headers_mut().insert(k.clone(), v);
        }
    }
    resp
}

/// Parses `Prefer: wait=N` (RFC 7240); preferences we do not understand are ignored.
pub fn prefer_wait(headers: &HeaderMap) -> Option<u64> {
    preferences(headers).find_map(|(k, v)| {
        if k.eq_ignore_ascii_case("wait") {
            v.parse::<u64>().ok()
        } else {
            None
        }
    })
}

/// Whether the caller sent `Prefer: return=minimal` (RFC 7240 §4.2).
pub fn prefer_minimal(headers: &HeaderMap) -> bool {
    preferences(headers)
        .any(|(k, v)| k.eq_ignore_ascii_case("return") && v.eq_ignore_ascii_case("minimal"))
}

/// Every `name=value` of every `Prefer` header (split at commas and
/// semicolons, trimmed, value unquoted).
fn preferences(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .filter_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            Some((k.trim(), v.trim().trim_matches('"')))
        })
}

/// Parses `Idempotency-Key`: 1 to 255 visible ASCII characters (surrounding
/// quotes and whitespace dropped); anything else is a 400 problem.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v.to_str().map_err(|_| {
        ApiError::bad_request("Idempotency-Key must be visible ASCII")
            .with("field", "Idempotency-Key")
    })?;
    let s = s.trim().trim_matches('"');
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(ApiError::bad_request(
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )
        .with("field", "Idempotency-Key"));
    }
    Ok(Some(s.to_string()))
}

/// Checks a submit body and turns it into a new request.
pub fn new_request(
    engine: &Engine,
    tenant: &str,
    queue: &str,
    body: SubmitBody,
) -> Result<NewRequest, Invalid> {
    validate::name("queue", queue)?;
    if let Some(c) = &body.correlation_id {
        validate::text("correlation_id", c, 256)?;
    }
    let delay = validate::opt_duration("delay", body.delay)?;
    let timeout = validate::opt_duration("timeout", body.timeout)?;
    let max_attempts = body
        .max_attempts
        .unwrap_or(engine.config.default_max_attempts);
    if !(1..=1000).contains(&max_attempts) {
        return Err(Invalid::new("max_attempts", "must be between 1 and 1000"));
    }
    match &body.reply_to {
        Some(ReplyTo::Channel(c)) => validate::name("reply_to.channel", c)?,
        Some(ReplyTo::Webhook(w)) => {
            let u = w.url.to_ascii_lowercase();
            if !(u.starts_with("https://") || u.starts_with("http://")) || w.url.len() > 2048 {
                return Err(Invalid::new(
                    "reply_to.webhook.url",
                    "must be an http(s) URL of at most 2048 bytes",
                ));
            }
            validate::text("reply_to.webhook.url", &w.url, 2048)?;
        }
        None => {}
    }
    let metadata = body.metadata.unwrap_or_default();
    if metadata.len() > 64 {
        return Err(Invalid::new("metadata", "at most 64 entries"));
    }
    for (k, v) in &metadata {
        validate::text("metadata", k, 128)?;
        validate::text("metadata", v, 2048)?;
    }
    if let Some(f) = &body.fallback_queue {
        validate::name("fallback_queue", f)?;
    }
    if let Some(f) = &body.fairness_key {
        validate::text("fairness_key", f, 128)?;
    }
    Ok(NewRequest {
        id: coatcheck_core::model::new_request_id(),
        tenant: tenant.to_string(),
        queue: queue.to_string(),
        input: body.input,
        correlation_id: body.correlation_id,
        priority: body.priority.unwrap_or(0),
        delay,
        timeout,
        max_attempts,
        reply_to: body.reply_to,
        metadata,
        fallback_queue: body.fallback_queue,
        fallback_of: None,
        fairness_key: body.fairness_key,
    })
}

/// Refuses a webhook return address the server could not (or must not)
/// deliver to: no signing secret configured, or a non-public target.
async fn check_webhook(engine: &Engine, url: &str) -> Result<(), ApiError> {
    if engine.config.webhook_secrets.is_empty() {
        return Err(ApiError::bad_request(
            "webhook replies need a signing secret: start the server with --webhook-secret",
        )
        .with("field", "reply_to.webhook.url"));
    }
    crate::webhook::resolve_target(url, engine.config.webhook_allow_private)
        .await
        .map(|_| ())
        .map_err(|e| {
            ApiError::bad_request(format!("reply_to.webhook.url: {e}"))
                .with("field", "reply_to.webhook.url")
        })
}

/// A hash of what was submitted, independent of key order and whitespace.
fn body_hash(queue: &str, raw: &[u8]) -> String {
    let canonical = serde_json::from_slice::<serde_json::Value>(raw)
        .map(|v| v.to_string())
        .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(queue.as_bytes());
    h.update([0]);
    h.update(canonical.as_bytes());
    hex::encode(h.finalize())
}

/// Submit a request: 202 with a ticket once it is durably stored.
#[utoipa::path(post, path = "/v1/queues/{queue}/requests", tag = "client",
    params(("queue" = String, Path, description = "A queue name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"),
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters; a retry with the same key and body is answered with the first request", pattern = r"^[!-~]{1,255}$"),
        ("Prefer" = Option<String>, Header, description = "`wait=N` (RFC 7240): answer 200 with the terminal request if it finishes within N seconds")),
    request_body = SubmitBody,
    responses(
        (status = 202, description = "Accepted and durably stored", body = Request),
        (status = 200, description = "Idempotent replay, or terminal within Prefer: wait", body = Request),
        (status = 400, body = coatcheck_core::wire::Problem), (status = 413, body = coatcheck_core::wire::Problem),
        (status = 415, body = coatcheck_core::wire::Problem), (status = 422, body = coatcheck_core::wire::Problem)))]
pub async fn submit(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(queue): Segment,
    headers: HeaderMap,
    body: JsonBody<SubmitBody>,
) -> Result<Response, ApiError> {
    caller.require(Role::Client)?;
    caller.require_queue(&queue)?;
    validate::name("queue", &queue)?;
    // Fair claiming rotates across fairness keys: with keys configured only
    // admins may pick one, or a tenant could take many turns by inventing keys.
    if caller.key.is_some() && caller.role != Role::Admin && body.value.fairness_key.is_some() {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            "fairness_key may only be set by admin keys (client requests are shared fairly by tenant)",
        )
        .with("field", "fairness_key"));
    }
    engine.admit_submit(&caller, &queue).await?;
    let idem = idempotency_key(&headers)?;
    let wait = prefer_wait(&headers);
    let new = new_request(&engine, &caller.tenant, &queue, body.value)?;
    if let Some(ReplyTo::Webhook(w)) = &new.reply_to {
        check_webhook(&engine, &w.url).await?;
    }
    let idempotency = idem.map(|key| Idempotency {
        key,
        body_hash: body_hash(&queue, &body.raw),
    });
    // Waiting: subscribe before the request exists, so no change can slip
    // between the submit and the wait, and the wait starts without a read.
    let early = wait.map(|_| engine.subscribe_finished(&new.id));
    let p = SubmitParams {
        new,
        idempotency,
        now: engine.now(),
    };
    // A client that waits gets no answer before its request finishes or the
    // wait ends, and the completion's flush covers the submit: the submit
    // need not be flushed on its own. Whatever ends the wait, the request is
    // on disk before any answer leaves (`sync_through` below).
    let (submitted, unsynced) = match wait {
        Some(_) => engine.submit_unsynced(p).await?,
        None => (engine.submit(p).await?, None),
    };
    let (req, replayed) = match submitted {
        Submitted::Created(r) => (r, false),
        Submitted::Replayed(r) => (r, true),
    };
    let waited = match wait {
        Some(n) => wait_for(&engine, &caller, n, req, replayed, early).await,
        None => Ok((req, None)),
    };
    if let Some(mark) = unsynced {
        engine.sync_through(mark).await?;
    }
    let (req, applied) = waited?;
    let loc = location(&req.id);
    let op = match &engine.config.public_url {
        Some(base) => format!("{}{loc}", base.trim_end_matches('/')),
        None => loc.clone(),
    };
    let mut hs = vec![
        (header::LOCATION, loc),
        (HeaderName::from_static("operation-location"), op),
    ];
    // Preference-Applied only on the 200 the preference produced.
    if let Some(n) = applied.filter(|_| req.status.is_terminal() && !replayed) {
        hs.push((
            HeaderName::from_static("preference-applied"),
            format!("wait={n}"),
        ));
    }
    let code = if replayed {
        hs.push((
            HeaderName::from_static("idempotent-replayed"),
            "true".into(),
        ));
        StatusCode::OK
    } else if req.status.is_terminal() && applied.is_some() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    if !req.status.is_terminal() {
        hs.push((header::RETRY_AFTER, POLL_AFTER.into()));
    }
    Ok(with_headers((code, Json(req)).into_response(), &hs))
}

/// The `Prefer: wait=N` part of a submit: the request once finished, or as
/// it is when the wait ends, and the wait honoured (clamped to the cap).
async fn wait_for(
    engine: &Engine,
    caller: &Caller,
    n: u64,
    req: Request,
    replayed: bool,
    early: Option<crate::notify::Subscription>,
) -> Result<(Request, Option<u64>), ApiError> {
    let _permit = engine.stream_permit(caller)?;
    let d = Duration::from_secs(n).min(engine.config.max_wait);
    let r = RequestRef {
        id: req.id.clone(),
        tenant: Some(caller.tenant.clone()),
    };
    let req = match early {
        // A new request: the subscription predates it.
        Some(sub) if !replayed => engine.wait_subscribed(sub, r, Some(req), d).await?,
        // A replay is an older request: wait on it from a fresh read.
        _ => engine.wait_finished(r, d).await?,
    };
    Ok((req, Some(d.as_secs())))
}

/// `?wait=N`.
#[derive(Debug, Deserialize)]
pub struct WaitQuery {
    /// Seconds to long-poll.
    pub wait: Option<f64>,
}

/// Clamps a requested wait to the server's cap; negative or non-numbers are 400.
pub fn wait_duration(engine: &Engine, wait: Option<f64>) -> Result<Duration, ApiError> {
    let Some(w) = wait else {
        return Ok(Duration::ZERO);
    };
    if !w.is_finite() || w < 0.0 {
        return Err(Invalid::new("wait", "must be a non-negative number of seconds").into());
    }
    Ok(Duration::from_secs_f64(
        w.min(engine.config.max_wait.as_secs_f64()),
    ))
}

fn request_response(req: Request) -> Response {
    let terminal = req.status.is_terminal();
    let mut resp = Json(req).into_response();
    if !terminal {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(POLL_AFTER));
    }
    resp
}

/// The status monitor: the request, long-polling with `?wait=N`.
#[utoipa::path(get, path = "/v1/requests/{id}", tag = "client",
    params(("id" = String, Path, description = "A request id"), ("wait" = Option<f64>, Query, description = "Long-poll up to this many seconds (clamped to the server's cap)", minimum = 0)),
    responses((status = 200, body = Request), (status = 404, body = coatcheck_core::wire::Problem)))]
pub async fn status(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(id): Segment,
    QueryParams(q): QueryParams<WaitQuery>,
) -> Result<Response, ApiError> {
    caller.require(Role::Client)?;
    let r = request_ref(&caller, id)?;
    let wait = wait_duration(&engine, q.wait)?;
    let _permit = if wait.is_zero() {
        None
    } else {
        Some(engine.stream_permit(&caller)?)
    };
    let req = engine.wait_finished(r, wait).await?;
    Ok(request_response(req))
}

/// The result endpoint: 200 with the output, 202 while running, 409 if it did not succeed.
#[utoipa::path(get, path = "/v1/requests/{id}/result", tag = "client", params(("id" = String, Path, description = "A request id")),
    responses((status = 200, description = "The output JSON as is", body = serde_json::Value),
        (status = 202, description = "Not finished yet: the request as it is", body = Request),
        (status = 409, description = "Failed, cancelled or expired", body = coatcheck_core::wire::Problem)))]
pub async fn result(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(id): Segment,
) -> Result<Response, ApiError> {
    caller.require(Role::Client)?;
    let r = request_ref(&caller, id)?;
    let req = engine.get(r).await?;
    match req.status {
        Status::Succeeded => {
            let body = req
                .output
                .map(|o| o.get().to_string())
                .unwrap_or_else(|| "null".into());
            Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
        }
        Status::Queued | Status::Running => Ok(with_headers(
            (StatusCode::ACCEPTED, Json(&req)).into_response(),
            &[
                (header::RETRY_AFTER, POLL_AFTER.into()),
                (header::LOCATION, location(&req.id)),
            ],
        )),
        status => Err(ApiError::new(
            StatusCode::CONFLICT,
            "request-not-succeeded",
            "The request did not succeed",
            format!("the request is {status}; it has no output"),
        )
        .with("request_status", status.as_str())
        .with(
            "error",
            serde_json::to_value(&req.error).unwrap_or_default(),
        )),
    }
}

/// The request's timeline, oldest first.
#[utoipa::path(get, path = "/v1/requests/{id}/history", tag = "client", params(("id" = String, Path, description = "A request id")),
    responses((status = 200, body = HistoryResponse), (status = 404, body = coatcheck_core::wire::Problem)))]
pub async fn history(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(id): Segment,
) -> Result<Json<HistoryResponse>, ApiError> {
    caller.require(Role::Client)?;
    let r = request_ref(&caller, id)?;
    Ok(Json(HistoryResponse {
        events: engine.history(r, 0).await?,
    }))
}

/// Cancel: queued → cancelled (200); running → cancel requested (202); terminal → 409.
#[utoipa::path(delete, path = "/v1/requests/{id}", tag = "client", params(("id" = String, Path, description = "A request id")),
    responses((status = 200, description = "Cancelled", body = Request), (status = 202, description = "Cancel requested of a running request", body = Request),
        (status = 409, body = coatcheck_core::wire::Problem)))]
pub async fn cancel(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(id): Segment,
) -> Result<Response, ApiError> {
    caller.require(Role::Client)?;
    let r = request_ref(&caller, id)?;
    let (outcome, req) = engine.cancel(r).await?;
    let code = match outcome {
        CancelOutcome::Cancelled => StatusCode::OK,
        CancelOutcome::Requested => StatusCode::ACCEPTED,
    };
    Ok((code, Json(req)).into_response())
}

#[derive(Debug, Deserialize)]
/// The filters of a list.
pub struct ListQuery {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this status.
    pub status: Option<String>,
    /// Only this correlation id.
    pub correlation_id: Option<String>,
    /// Page size, 1..1000.
    pub limit: Option<u32>,
    /// The cursor from the previous page.
    pub page_token: Option<String>,
}

/// List requests, newest first, with filters and page tokens.
#[utoipa::path(get, path = "/v1/requests", tag = "client",
    params(("queue" = Option<String>, Query, pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"), ("status" = Option<Status>, Query),
        ("correlation_id" = Option<String>, Query, max_length = 256, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$"),
        ("limit" = Option<u32>, Query, description = "1..1000, default 50", minimum = 1, maximum = 1000),
        ("page_token" = Option<String>, Query, description = "`next_page_token` of the previous page (opaque; issued to this caller)")),
    responses((status = 200, body = ListResponse), (status = 400, body = coatcheck_core::wire::Problem)))]
pub async fn list(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<ListResponse>, ApiError> {
    caller.require(Role::Client)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(Invalid::new("limit", "must be between 1 and 1000").into());
    }
    if let Some(queue) = &q.queue {
        validate::name("queue", queue)?;
    }
    // What a submit would refuse cannot match anything; refusing it here
    // also keeps bytes a store cannot take (NUL on PostgreSQL: was a 500)
    // away from the store.
    if let Some(c) = &q.correlation_id {
        validate::text("correlation_id", c, 256)?;
    }
    let status = match &q.status {
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            Invalid::new(
                "status",
                "must be one of queued, running, succeeded, failed, cancelled, expired",
            )
        })?),
        None => None,
    };
    let scope = caller.scope();
    let before_id = q
        .page_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .map(|t| engine.page_tokens.decode(scope.as_deref(), t))
        .transpose()?;
    let mut requests = engine
        .list(ListParams {
            tenant: scope.clone(),
            queue: q.queue,
            status,
            correlation_id: q.correlation_id,
            before_id,
            limit: limit + 1,
        })
        .await?;
    let next_page_token = if requests.len() > limit as usize {
        requests.truncate(limit as usize);
        requests
            .last()
            .map(|r| engine.page_tokens.encode(scope.as_deref(), &r.id))
    } else {
        None
    };
    Ok(Json(ListResponse {
        requests,
        next_page_token,
    }))
}

/// Redrive a failed, cancelled or expired request (dead-letter re-drive).
#[utoipa::path(post, path = "/v1/requests/{id}/redrive", tag = "operations", params(("id" = String, Path, description = "A request id")),
    responses((status = 200, body = Request), (status = 409, body = coatcheck_core::wire::Problem)))]
pub async fn redrive(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(id): Segment,
) -> Result<Json<Request>, ApiError> {
    caller.require(Role::Admin)?;
    let r = request_ref(&caller, id)?;
    Ok(Json(engine.redrive(r).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Headers holding `name: value` for each value that is a valid header value.
    fn headers(name: &'static str, values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                h.append(name, v);
            }
        }
        h
    }

    fn prefer(v: &str) -> Option<u64> {
        prefer_wait(&headers("prefer", &[v.as_bytes()]))
    }

    #[test]
    fn prefer_wait_reads_the_forms_of_rfc_7240() {
        assert_eq!(prefer("wait=5"), Some(5));
        assert_eq!(prefer("respond-async, wait=10"), Some(10));
        assert_eq!(prefer("handling=lenient; wait=2"), Some(2));
        assert_eq!(prefer("WAIT = 7"), Some(7));
        assert_eq!(prefer("wait=\"3\""), Some(3));
        assert_eq!(prefer("wait=18446744073709551615"), Some(u64::MAX));
        for ignored in [
            "",
            "wait",
            "wait=",
            "wait=-1",
            "wait=1.5",
            "wait=x",
            "waiting=3",
            "return=minimal",
        ] {
            assert_eq!(prefer(ignored), None, "{ignored}");
        }
        // Across several Prefer headers.
        let h = headers("prefer", &[b"respond-async", b"wait=4"]);
        assert_eq!(prefer_wait(&h), Some(4));
    }

    #[test]
    fn prefer_minimal_reads_return_minimal_only() {
        let minimal = |v: &str| prefer_minimal(&headers("prefer", &[v.as_bytes()]));
        for yes in [
            "return=minimal",
            "wait=3, return=minimal",
            "RETURN = \"Minimal\"",
        ] {
            assert!(minimal(yes), "{yes}");
        }
        for no in [
            "",
            "return=representation",
            "return",
            "minimal",
            "returns=minimal",
        ] {
            assert!(!minimal(no), "{no}");
        }
        let h = headers("prefer", &[b"respond-async", b"return=minimal"]);
        assert!(prefer_minimal(&h));
    }

    fn problem_field(e: &ApiError) -> serde_json::Value {
        e.problem()
            .extensions
            .get("field")
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn idempotency_key_is_1_to_255_visible_ascii() {
        let key = |v: &[u8]| idempotency_key(&headers("idempotency-key", &[v]));
        assert_eq!(key(b"abc").unwrap().as_deref(), Some("abc"));
        assert_eq!(key(b" \"k-1\" ").unwrap().as_deref(), Some("k-1"));
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), None);
        let long = "k".repeat(256);
        for bad in [&b""[..], b"\"\"", b"a b", long.as_bytes(), b"caf\xc3\xa9"] {
            let e = key(bad).expect_err("refused");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            assert_eq!(problem_field(&e), "Idempotency-Key");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prefer_never_panics_and_only_reads_wait(values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..4)) {
            let values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
            let h = headers("prefer", &values);
            if let Some(n) = prefer_wait(&h) {
                let text: String = h.get_all("prefer").iter().map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase()).collect();
                prop_assert!(text.contains("wait") && text.contains(&n.to_string()), "{text} → {n}");
            }
        }

        #[test]
        fn prefer_finds_wait_among_other_preferences(
            n in any::<u64>(),
            before in proptest::collection::vec("[a-vx-z][a-z-]{0,8}(=[a-z0-9]{1,4})?", 0..3),
            after in proptest::collection::vec("[a-vx-z][a-z-]{0,8}(=[a-z0-9]{1,4})?", 0..3),
            sep in prop_oneof![Just(", "), Just(","), Just("; ")],
        ) {
            let mut parts = before.clone();
            parts.push(format!("wait={n}"));
            parts.extend(after);
            prop_assert_eq!(prefer(&parts.join(sep)), Some(n));
        }

        #[test]
        fn idempotency_key_accepts_visible_ascii_and_refuses_the_rest_with_a_400(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let h = headers("idempotency-key", &[&bytes]);
            match idempotency_key(&h) {
                Ok(None) => prop_assert!(h.is_empty()),
                Ok(Some(k)) => {
                    prop_assert!(!k.is_empty() && k.len() <= 255);
                    prop_assert!(k.bytes().all(|b| (0x21..0x7f).contains(&b)));
                }
                Err(e) => {
                    prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                    prop_assert_eq!(problem_field(&e), "Idempotency-Key");
                }
            }
        }

        #[test]
        fn any_visible_ascii_key_is_kept_as_is(k in "[!#-~]{1,255}") {
            let h = headers("idempotency-key", &[k.as_bytes()]);
            prop_assert_eq!(idempotency_key(&h).expect("accepted"), Some(k));
        }
    }
}
