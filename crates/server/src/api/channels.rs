//! Reply channels, the durable return address: long-poll receive with a
//! visibility timeout, ack by token, and the same messages over SSE.
//! Channels need no creation step; they are scoped to the caller's tenant.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use coatcheck_core::validate::{self, Invalid};
use coatcheck_core::wire::{AckBody, AckResponse, ChannelMessage, ChannelMessages};
use coatcheck_store::ChannelReceiveParams;
use serde::Deserialize;

use super::auth::Caller;
use super::extract::{JsonBody, QueryParams, Segment};
use super::problem::ApiError;
use super::requests::wait_duration;
use crate::engine::Engine;
use crate::keys::Role;
use crate::notify::Key;

/// The routes of this file.
pub fn router() -> Router<Arc<Engine>> {
    Router::new()
        .route("/v1/channels/{name}/messages", get(receive))
        .route("/v1/channels/{name}/ack", post(ack))
        .route("/v1/channels/{name}/events", get(events))
}

/// Visibility when a receive gives none.
const DEFAULT_VISIBILITY: Duration = Duration::from_secs(30);

/// `?max=&wait=&visibility=` of a receive.
#[derive(Debug, Deserialize)]
pub struct ReceiveQuery {
    /// 1..100, default 10.
    pub max: Option<u32>,
    /// Seconds to long-poll (capped).
    pub wait: Option<f64>,
    /// Seconds each message stays hidden (default 30).
    pub visibility: Option<f64>,
    /// SSE only: remove each message as it is written to the stream.
    pub auto_ack: Option<bool>,
}

fn visibility(v: Option<f64>) -> Result<Duration, ApiError> {
    match validate::opt_duration("visibility", v)? {
        Some(d) if d < Duration::from_millis(1) => {
            Err(Invalid::new("visibility", "must be more than 0 seconds").into())
        }
        Some(d) => Ok(d),
        None => Ok(DEFAULT_VISIBILITY),
    }
}

impl Engine {
    /// Receives up to `max` messages, long-polling up to `wait` for the first.
    pub async fn channel_receive(
        &self,
        tenant: &str,
        channel: &str,
        max: u32,
        visibility: Duration,
        wait: Duration,
    ) -> coatcheck_store::Result<Vec<ChannelMessage>> {
        let mut sub = self
            .notifier
            .subscribe(Key::Channel(tenant.to_string(), channel.to_string()));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let now = self.now();
            let p = ChannelReceiveParams {
                tenant: tenant.to_string(),
                channel: channel.to_string(),
                max,
                visibility,
                now,
            };
            let got = self.store.channel_receive(p).await?;
            if !got.is_empty() {
                // Unacked, they become visible again: wake receivers then.
                self.timers
                    .scheduler
                    .hint(coatcheck_core::clock::add(now, visibility));
                return Ok(got);
            }
            if wait.is_zero()
                || tokio::time::Instant::now() >= deadline
                || self.shutdown.is_cancelled()
            {
                return Ok(got);
            }
            tokio::select! {
                _ = sub.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.shutdown.cancelled() => return Ok(Vec::new()),
            }
        }
    }
}

/// Receive reply messages; each is hidden for `visibility` seconds.
#[utoipa::path(get, path = "/v1/channels/{name}/messages", tag = "client",
    params(("name" = String, Path, description = "A channel name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"), ("max" = Option<u32>, Query, description = "1..100, default 10", minimum = 1, maximum = 100),
        ("wait" = Option<f64>, Query, description = "Long-poll up to this many seconds (clamped to the server's cap)", minimum = 0),
        ("visibility" = Option<f64>, Query, description = "Seconds each message stays hidden, default 30", minimum = 0.001, maximum = 315360000)),
    responses((status = 200, body = ChannelMessages), (status = 400, body = coatcheck_core::wire::Problem)))]
pub async fn receive(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(name): Segment,
    QueryParams(q): QueryParams<ReceiveQuery>,
) -> Result<Json<ChannelMessages>, ApiError> {
    caller.require(Role::Client)?;
    validate::name("channel", &name)?;
    let max = q.max.unwrap_or(10);
    if !(1..=100).contains(&max) {
        return Err(Invalid::new("max", "must be between 1 and 100").into());
    }
    let vis = visibility(q.visibility)?;
    let wait = wait_duration(&engine, q.wait)?;
    let _permit = if wait.is_zero() {
        None
    } else {
        Some(engine.stream_permit(&caller)?)
    };
    let messages = engine
        .channel_receive(&caller.tenant, &name, max, vis, wait)
        .await?;
    Ok(Json(ChannelMessages { messages }))
}

/// Acknowledge received messages: they are removed for good.
#[utoipa::path(post, path = "/v1/channels/{name}/ack", tag = "client", params(("name" = String, Path, description = "A channel name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")),
    request_body = AckBody,
    responses((status = 200, body = AckResponse), (status = 400, body = coatcheck_core::wire::Problem)))]
pub async fn ack(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(name): Segment,
    body: JsonBody<AckBody>,
) -> Result<Json<AckResponse>, ApiError> {
    caller.require(Role::Client)?;
    validate::name("channel", &name)?;
    let tokens = body.value.ack_tokens;
    if tokens.is_empty() || tokens.len() > 1000 {
        return Err(Invalid::new("ack_tokens", "must hold 1 to 1000 tokens").into());
    }
    for t in &tokens {
        validate::text("ack_tokens", t, 128)?;
    }
    let results = engine
        .store
        .channel_ack(caller.tenant.clone(), name, tokens.clone(), engine.now())
        .await?;
    let mut out = AckResponse {
        acked: Vec::new(),
        not_found: Vec::new(),
    };
    for (t, ok) in tokens.into_iter().zip(results) {
        if ok {
            out.acked.push(t);
        } else {
            out.not_found.push(t);
        }
    }
    Ok(Json(out))
}

struct ChannelStream {
    engine: Arc<Engine>,
    tenant: String,
    channel: String,
    visibility: Duration,
    auto_ack: bool,
    queue: VecDeque<(Event, String)>,
    /// With auto_ack: tokens of messages already handed to the stream,
    /// acknowledged before the next receive.
    written: Vec<String>,
    _permit: crate::limits::StreamPermit,
}

/// The channel's messages pushed over SSE (`event: message`, `id:` the
/// message id, data the message with its ack token). Each is removed when the
/// client acks it, or with `?auto_ack=true` as it is written to the stream.
#[utoipa::path(get, path = "/v1/channels/{name}/events", tag = "client", operation_id = "channel_events",
    params(("name" = String, Path, description = "A channel name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"), ("visibility" = Option<f64>, Query, minimum = 0.001, maximum = 315360000), ("auto_ack" = Option<bool>, Query)),
    responses((status = 200, description = "text/event-stream of message events"), (status = 400, body = coatcheck_core::wire::Problem)))]
pub async fn events(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(name): Segment,
    QueryParams(q): QueryParams<ReceiveQuery>,
) -> Result<Response, ApiError> {
    caller.require(Role::Client)?;
    validate::name("channel", &name)?;
    let st = ChannelStream {
        engine: engine.clone(),
        tenant: caller.tenant.clone(),
        channel: name,
        visibility: visibility(q.visibility)?,
        auto_ack: q.auto_ack.unwrap_or(false),
        queue: VecDeque::new(),
        written: Vec::new(),
        _permit: engine.stream_permit(&caller)?,
    };
    let stream = futures::stream::unfold(st, next_message);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(engine.config.sse_keep_alive))
        .into_response())
}

async fn next_message(mut st: ChannelStream) -> Option<(Result<Event, Infallible>, ChannelStream)> {
    loop {
        if let Some((e, token)) = st.queue.pop_front() {
            if st.auto_ack {
                st.written.push(token);
            }
            return Some((Ok(e), st));
        }
        // Everything handed to the stream so far is written: with auto_ack
        // it is removed now, before anything else is received.
        if !st.written.is_empty() {
            let tokens = std::mem::take(&mut st.written);
            let now = st.engine.now();
            st.engine
                .store
                .channel_ack(st.tenant.clone(), st.channel.clone(), tokens, now)
                .await
                .ok()?;
        }
        if st.engine.shutdown.is_cancelled() {
            return None;
        }
        let wait = st.engine.config.max_wait;
        let got = st
            .engine
            .channel_receive(&st.tenant, &st.channel, 10, st.visibility, wait)
            .await
            .ok()?;
        for m in got {
            let ev = Event::default()
                .event("message")
                .id(m.message.message_id.clone())
                .data(serde_json::to_string(&m).unwrap_or_default());
            st.queue.push_back((ev, m.ack_token));
        }
    }
}
