//! Who is calling, and what they may do. Handlers take a [`Caller`] and ask
//! it: [`Caller::require`] a role, [`Caller::require_queue`] a queue, and
//! [`Caller::scope`] for the tenant their reads and writes are confined to.
//!
//! With no keys configured every caller is the `default` tenant's admin
//! (and the server only listens on loopback). With keys: a missing or
//! unknown key is `401` with `WWW-Authenticate`, a key without the right is
//! `403`, and another tenant's request or channel is simply not there (`404`).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};

use super::problem::ApiError;
use crate::engine::Engine;
use crate::keys::Role;

/// The tenant used when no keys are configured.
pub const DEFAULT_TENANT: &str = "default";

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The caller's tenant.
    pub tenant: String,
    /// The caller's role.
    pub role: Role,
    /// The queues the key may use (`None`: all).
    pub queues: Option<Vec<String>>,
    /// The key's name, for logs (`None` without keys).
    pub key: Option<String>,
}

impl Caller {
    /// The caller without keys configured: the default tenant's admin.
    pub fn anonymous() -> Self {
        Caller {
            tenant: DEFAULT_TENANT.to_string(),
            role: Role::Admin,
            queues: None,
            key: None,
        }
    }

    /// The tenant scope of the caller's reads and writes of requests: `None`
    /// (every tenant) for admins and workers (a worker serves its queues for
    /// every tenant), the caller's tenant for clients.
    pub fn scope(&self) -> Option<String> {
        match self.role {
            Role::Admin | Role::Worker => None,
            Role::Client => Some(self.tenant.clone()),
        }
    }

    /// Refuses (403) unless the caller has `role` (admins have every role).
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role == role || self.role == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "Forbidden",
                format!(
                    "this key has the {} role; this call needs {}",
                    self.role.as_str(),
                    role.as_str()
                ),
            ))
        }
    }

    /// Whether the key may use `queue`.
    pub fn may_use(&self, queue: &str) -> bool {
        self.queues
            .as_ref()
            .is_none_or(|qs| qs.iter().any(|q| q == queue))
    }

    /// Refuses (403) unless the key may use `queue`.
    pub fn require_queue(&self, queue: &str) -> Result<(), ApiError> {
        if self.may_use(queue) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "Forbidden",
                format!("this key may not use the queue {queue}"),
            ))
        }
    }
}

fn unauthorized(detail: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        detail,
    )
    .header(header::WWW_AUTHENTICATE, "Bearer realm=\"coatcheck\"")
}

impl FromRequestParts<Arc<Engine>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, engine: &Arc<Engine>) -> Result<Self, ApiError> {
        let keys = engine.keys();
        // Anonymous only when no keys file is configured at all. A keys file
        // with no keys in it (emptied by mistake, or read half-written on
        // SIGHUP) lets no one in; it must never open the server to everyone.
        if keys.is_empty() && engine.config.keys_file.is_none() {
            return Ok(Caller::anonymous());
        }
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(
                "this server needs an API key: Authorization: Bearer <key>",
            ));
        };
        let value = value.to_str().unwrap_or("");
        let secret = match value.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            _ => {
                return Err(unauthorized(
                    "the Authorization header must be: Bearer <key>",
                ))
            }
        };
        match keys.authenticate(secret) {
            Some(k) => Ok(Caller {
                tenant: k.tenant.clone(),
                role: k.role,
                queues: k.queues.clone(),
                key: Some(k.name.clone()),
            }),
            None => Err(unauthorized("the API key is not valid")),
        }
    }
}

impl Engine {
    /// Opens a long-poll/stream slot for the caller, or refuses with 429.
    pub fn stream_permit(&self, caller: &Caller) -> Result<crate::limits::StreamPermit, ApiError> {
        let key = caller
            .key
            .clone()
            .unwrap_or_else(|| format!("tenant:{}", caller.tenant));
        self.limiter
            .open_stream(&self.config.limits, &key)
            .ok_or_else(|| {
                self.metrics.refused("streams");
                ApiError::too_many(
                    "streams",
                    format!(
                        "this key already holds {} open long-polls or streams",
                        self.config.limits.max_streams_per_key
                    ),
                    1,
                )
            })
    }

    /// Applies the submit rate and queue depth limits before a submit.
    pub async fn admit_submit(&self, caller: &Caller, queue: &str) -> Result<(), ApiError> {
        let limits = &self.config.limits;
        if let Err(wait) = self.limiter.take_submit(limits, &caller.tenant) {
            self.metrics.refused("submit_rate");
            return Err(ApiError::too_many(
                "submit_rate",
                "this tenant is over its submit rate; slow down",
                wait.as_secs_f64().ceil() as u64,
            ));
        }
        if let Some(max) = limits.depth_limit(queue) {
            let depth = match self.limiter.cached_depth(queue) {
                Some(d) => d,
                None => {
                    let d = self.store.queue_depth(queue).await?;
                    self.limiter.note_depth(queue, d);
                    d
                }
            };
            if depth >= max {
                self.metrics.refused("queue_depth");
                return Err(ApiError::too_many(
                    "queue_depth",
                    format!("the queue {queue} is full ({max} queued)"),
                    1,
                ));
            }
            self.limiter.bump_depth(queue);
        }
        Ok(())
    }
}
