//! Operations: queue overview, health, readiness, metrics, the OpenAPI
//! document and the status page.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use coatcheck_core::wire::{QueueInfo, QueuesResponse};
use coatcheck_core::Status;
use utoipa::OpenApi;

use super::auth::Caller;
use super::problem::ApiError;
use crate::engine::Engine;
use crate::keys::Role;

/// The routes of this file.
pub fn router() -> Router<Arc<Engine>> {
    Router::new()
        .route("/v1/queues", get(queues))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/", get(index))
}

async fn queue_infos(engine: &Engine) -> Result<Vec<QueueInfo>, ApiError> {
    let now = engine.now();
    let stats = engine.store.queue_stats(now).await?;
    Ok(stats
        .into_iter()
        .map(|q| QueueInfo {
            counts: Status::ALL
                .into_iter()
                .map(|s| {
                    (
                        s,
                        q.counts
                            .iter()
                            .find(|(st, _)| *st == s)
                            .map(|(_, n)| *n)
                            .unwrap_or(0),
                    )
                })
                .collect(),
            oldest_queued_age: q
                .oldest_ready
                .map(|t| ((now - t).num_milliseconds().max(0) as f64) / 1000.0),
            claim_rate: engine.metrics.claim_rate(&q.queue, now),
            name: q.queue,
        })
        .collect())
}

/// Per queue: counts by status, oldest queued age, claim rate.
#[utoipa::path(get, path = "/v1/queues", tag = "operations",
    responses((status = 200, body = QueuesResponse)))]
pub async fn queues(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
) -> Result<Json<QueuesResponse>, ApiError> {
    caller.require(Role::Admin)?;
    Ok(Json(QueuesResponse {
        queues: queue_infos(&engine).await?,
    }))
}

/// Liveness: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process is up")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "The store answers"), (status = 503, body = coatcheck_core::wire::Problem)))]
pub async fn readyz(
    State(engine): State<Arc<Engine>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if engine.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            "the server is shutting down",
        )
        .header(header::RETRY_AFTER, "1"));
    }
    match tokio::time::timeout(std::time::Duration::from_secs(2), engine.store.store_ping()).await {
        Ok(Ok(())) => Ok(Json(serde_json::json!({"status": "ready"}))),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            format!("the store is not reachable: {e}"),
        )
        .header(header::RETRY_AFTER, "1")),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            "the store did not answer within 2 s",
        )
        .header(header::RETRY_AFTER, "1")),
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let stats = engine.store.queue_stats(engine.now()).await?;
    let body = engine.metrics.render(&stats, engine.store.flushes());
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

/// This API as an OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "This API as OpenAPI 3.1")))]
pub async fn openapi() -> Response {
    let doc = super::openapi::ApiDoc::openapi();
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.to_json().unwrap_or_default(),
    )
        .into_response()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A plain HTML status page.
#[utoipa::path(get, path = "/", tag = "operations", responses((status = 200, description = "A status page (HTML)")))]
pub async fn index(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
) -> Result<Html<String>, ApiError> {
    caller.require(Role::Admin)?;
    let queues = queue_infos(&engine).await?;
    let mut rows = String::new();
    for q in &queues {
        rows.push_str(&format!("<tr><td>{}</td>", esc(&q.name)));
        for s in Status::ALL {
            rows.push_str(&format!(
                "<td>{}</td>",
                q.counts.get(&s).copied().unwrap_or(0)
            ));
        }
        rows.push_str(&format!(
            "<td>{}</td><td>{:.2}</td></tr>",
            q.oldest_queued_age
                .map(|a| format!("{a:.1} s"))
                .unwrap_or_else(|| "–".into()),
            q.claim_rate
        ));
    }
    if queues.is_empty() {
        rows.push_str("<tr><td colspan=\"9\">No requests yet. Submit one: <code>curl -X POST -H 'content-type: application/json' -d '{\"input\":{}}' /v1/queues/demo/requests</code></td></tr>");
    }
    let heads: String = Status::ALL
        .iter()
        .map(|s| format!("<th>{s}</th>"))
        .collect();
    Ok(Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>coatcheck</title>\
<style>body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}}table{{border-collapse:collapse}}\
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style>\
</head><body><h1>coatcheck</h1><p>Version {}. <a href=\"/openapi.json\">OpenAPI</a> · <a href=\"/metrics\">metrics</a> · \
<a href=\"/v1/queues\">queues (JSON)</a></p><table><thead><tr><th>queue</th>{heads}<th>oldest queued</th><th>claims/s</th></tr></thead>\
<tbody>{rows}</tbody></table></body></html>",
        env!("CARGO_PKG_VERSION")
    )))
}
