//! The HTTP API of API.md: thin axum handlers, one file per resource, that
//! parse, authorise, call the engine, and map results to HTTP. Every error
//! — including what the framework would answer by itself (unknown route,
//! wrong method, body too large, wrong content type) — is a problem document.

pub mod auth;
pub mod channels;
pub mod events;
pub mod extract;
pub mod openapi;
pub mod ops;
pub mod page_token;
pub mod problem;
pub mod requests;
pub mod worker;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;

use self::problem::ApiError;
use crate::engine::Engine;

/// The whole application; tests and `serve` use the same function.
pub fn router(engine: Arc<Engine>) -> Router {
    let max_body = engine.config.max_body;
    Router::new()
        .merge(requests::router())
        .merge(worker::router())
        .merge(events::router())
        .merge(channels::router())
        .merge(ops::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(engine.clone(), observe))
        .with_state(engine)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route-not-found",
        "Not found",
        "there is no such route; see /openapi.json",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this route does not support this method; see the Allow header",
    )
}

/// The longest URL (path and query) accepted.
pub const MAX_URL: usize = 8 * 1024;
/// The most header bytes accepted.
pub const MAX_HEADERS: usize = 32 * 1024;

fn oversized(req: &Request) -> Option<ApiError> {
    let url = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().len())
        .unwrap_or(0);
    if url > MAX_URL {
        return Some(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri-too-long",
            "URI too long",
            format!("the URL is longer than {MAX_URL} bytes"),
        ));
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers > MAX_HEADERS {
        return Some(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request headers too large",
            format!("the headers are larger than {MAX_HEADERS} bytes"),
        ));
    }
    None
}

/// Records every call's latency by route and status, and turns a bare
/// framework rejection into a problem document as a last line of defence.
async fn observe(State(engine): State<Arc<Engine>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = match oversized(&req) {
        Some(refusal) => {
            engine
                .metrics
                .refused(if refusal.status() == StatusCode::URI_TOO_LONG {
                    "url_size"
                } else {
                    "header_size"
                });
            refusal.into_response()
        }
        None => next.run(req).await,
    };
    let status = resp.status();
    engine
        .metrics
        .http(&method, &route, status.as_u16(), start.elapsed());
    let is_problem = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if (status.is_client_error() || status.is_server_error()) && !is_problem {
        let allow = resp.headers().get(axum::http::header::ALLOW).cloned();
        let mut fixed = ApiError::new(
            status,
            "http-error",
            "Request refused",
            status.canonical_reason().unwrap_or("error").to_string(),
        )
        .into_response();
        if let Some(a) = allow {
            fixed.headers_mut().insert(axum::http::header::ALLOW, a);
        }
        return fixed;
    }
    resp
}
