//! `GET /v1/requests/{id}/events`: Server-Sent Events of one request.
//!
//! One event per change of the request: `event: status` or
//! `event: progress`, `data:` the Request JSON, `id:` the history `seq` of
//! the change. Built from the request's history, so `Last-Event-ID` replays
//! exactly what came after it. The stream closes after the terminal event;
//! a stream opened on a terminal request sends its state and closes; a
//! reconnect whose `Last-Event-ID` is already past the terminal event gets
//! `204 No Content` (which tells a browser EventSource to stop). Idle
//! streams send keep-alive comments. A stream costs one task-free future
//! and a notifier subscription — no polling.
//!
//! A live event's data is the request as its own change left it when this
//! node made the change (the notifier's [`Snapshots`]); for another node's
//! change, and in replays, it is the request as read.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use coatcheck_core::{EventKind, HistoryEvent, Request};
use coatcheck_store::RequestRef;

use super::auth::Caller;
use super::extract::Segment;
use super::problem::ApiError;
use super::requests::request_ref;
use crate::engine::Engine;
use crate::keys::Role;
use crate::notify::{Key, Snapshots, Subscription};

/// The routes of this file.
pub fn router() -> Router<Arc<Engine>> {
    Router::new().route("/v1/requests/{id}/events", get(events))
}

/// The SSE event name of a history event, or `None` for events that do not
/// change the Request (reply deliveries).
fn event_name(kind: &EventKind) -> Option<&'static str> {
    match kind {
        EventKind::Progress { .. } => Some("progress"),
        EventKind::ReplyDelivered { .. } | EventKind::ReplyDeliveryFailed { .. } => None,
        _ => Some("status"),
    }
}

fn is_terminal_event(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Succeeded { .. }
            | EventKind::Failed { .. }
            | EventKind::Cancelled
            | EventKind::Expired { .. }
    )
}

/// Parses `Last-Event-ID`; anything but a sequence number is a 400.
pub fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request("Last-Event-ID must be an event id this server sent (a number)")
            .with("field", "Last-Event-ID")
    };
    // Not text (obs-text bytes) is as malformed as any other non-number.
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<u64>().map(Some).map_err(|_| bad())
}

struct Stream_ {
    engine: Arc<Engine>,
    r: RequestRef,
    sub: Subscription,
    /// This node's changes of the request, each with the state it left.
    snaps: Snapshots,
    /// Those not yet sent (past `last`), oldest first.
    seen: Vec<Arc<Request>>,
    last: u64,
    queue: VecDeque<Event>,
    done: bool,
    _permit: crate::limits::StreamPermit,
}

fn sse_event(name: &str, seq: u64, req: &Request) -> Event {
    Event::default()
        .event(name)
        .id(seq.to_string())
        .data(serde_json::to_string(req).unwrap_or_default())
}

/// The state to send with the history event `seq`: the one the change that
/// wrote it left, if this node saw that change (`seen`: changes with their
/// state), else the latest known (`read`, which reflects it). A change
/// leaves the request at its last event's `history_seq`, so the state of
/// event `seq` is the earliest known state at or after it.
fn state_at<'a>(seq: u64, seen: &'a [Arc<Request>], read: &'a Request) -> &'a Request {
    seen.iter()
        .map(|r| r.as_ref())
        .filter(|r| r.history_seq >= seq)
        .min_by_key(|r| r.history_seq)
        .filter(|r| r.history_seq <= read.history_seq)
        .unwrap_or(read)
}

impl Stream_ {
    /// Queues the events after `last`; marks done after the terminal one.
    /// Each event carries the request as its change left it when this node
    /// made that change ([`state_at`]), else as `req` shows it.
    ///
    /// `req` must have been read *before* `events`: only the events it
    /// already reflects (`seq <= req.history_seq`) are taken; later ones
    /// come with the next read (their change notifies the subscription
    /// again). Fix: the history used to be read first, so a change landing
    /// between the two reads could end the stream on a terminal `req`
    /// without ever sending its terminal event — or, the other way round,
    /// consume the terminal event with a non-terminal `req` and hang.
    fn push(&mut self, events: &[HistoryEvent], req: &Request) {
        for e in events {
            if e.seq > req.history_seq {
                break;
            }
            self.last = e.seq;
            if let Some(name) = event_name(&e.kind) {
                let state = state_at(e.seq, &self.seen, req);
                let event = if std::ptr::eq(state, req) {
                    sse_event(name, e.seq, req)
                } else {
                    // A kept change: its input was left out (it never changes).
                    let mut full = state.clone();
                    full.input = req.input.clone();
                    sse_event(name, e.seq, &full)
                };
                self.queue.push_back(event);
            }
            if is_terminal_event(&e.kind) && req.status.is_terminal() {
                self.done = true;
            }
        }
        if req.status.is_terminal() && !self.done {
            // Terminal by an event before `last` (e.g. after a redrive race):
            // nothing more will come.
            self.done = true;
        }
        let last = self.last;
        self.seen.retain(|r| r.history_seq > last);
    }

    /// Keeps this node's changes that arrived meanwhile.
    fn take_snapshots(&mut self) {
        let (got, _lagged) = self.snaps.drain();
        // A dropped change only costs its event its own state (it falls
        // back to a later one), never the event.
        self.seen.extend(got);
    }
}

/// Server-Sent Events of one request.
#[utoipa::path(get, path = "/v1/requests/{id}/events", tag = "client", operation_id = "request_events",
    params(("id" = String, Path, description = "A request id"), ("Last-Event-ID" = Option<String>, Header, description = "The `id:` of the last event received: replay what came after it")),
    responses((status = 200, description = "text/event-stream of status and progress events"),
        (status = 204, description = "Already past the terminal event"), (status = 404, body = coatcheck_core::wire::Problem)))]
pub async fn events(
    State(engine): State<Arc<Engine>>,
    caller: Caller,
    Segment(id): Segment,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Role::Client)?;
    let r = request_ref(&caller, id)?;
    let last = last_event_id(&headers)?;
    // Subscribe before reading, so no change between the read and the wait is lost.
    let sub = engine.notifier.subscribe(Key::Request(r.id.clone()));
    let snaps = engine.notifier.snapshots(&r.id);
    let req = engine.get(r.clone()).await?;
    let permit = engine.stream_permit(&caller)?;
    let mut st = Stream_ {
        engine: engine.clone(),
        r: r.clone(),
        sub,
        snaps,
        seen: Vec::new(),
        last: 0,
        queue: VecDeque::new(),
        done: false,
        _permit: permit,
    };
    match last {
        None => {
            // The current state first, then what follows.
            st.last = req.history_seq;
            st.queue
                .push_back(sse_event("status", req.history_seq, &req));
            st.done = req.status.is_terminal();
        }
        Some(last) => {
            let events = engine.history(r.clone(), last).await?;
            let more = events.iter().any(|e| event_name(&e.kind).is_some());
            if req.status.is_terminal() && !more {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
            st.last = last;
            st.push(&events, &req);
        }
    }
    let stream = futures::stream::unfold(st, next);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(engine.config.sse_keep_alive))
        .into_response())
}

async fn next(mut st: Stream_) -> Option<(Result<Event, Infallible>, Stream_)> {
    loop {
        if let Some(e) = st.queue.pop_front() {
            return Some((Ok(e), st));
        }
        if st.done {
            return None;
        }
        tokio::select! {
            _ = st.sub.changed() => {}
            _ = st.engine.shutdown.cancelled() => return None,
        }
        // The request first, then its history (see `push`), then the
        // states of the changes seen meanwhile.
        let req = st.engine.get(st.r.clone()).await.ok()?;
        let events = st.engine.history(st.r.clone(), st.last).await.ok()?;
        st.take_snapshots();
        st.push(&events, &req);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn last(v: &[u8]) -> Option<Result<Option<u64>, ApiError>> {
        let v = HeaderValue::from_bytes(v).ok()?;
        let mut h = HeaderMap::new();
        h.insert("last-event-id", v);
        Some(last_event_id(&h))
    }

    /// Each event gets the state its own change left, when this node saw
    /// that change; else the latest read state (never a state from before
    /// the event, never one newer than the read).
    #[test]
    fn each_event_carries_the_state_its_change_left() {
        use crate::notify::tests::running;
        use coatcheck_core::Status;
        let mut progress = running("r", 3);
        progress.progress = Some(serde_json::value::to_raw_value(&50).unwrap());
        let mut done = running("r", 5);
        done.status = Status::Succeeded;
        let claimed = Arc::new(running("r", 2));
        let seen = vec![claimed.clone(), Arc::new(progress), Arc::new(done.clone())];
        // The read already shows the end: events 2 and 3 still get theirs.
        assert_eq!(state_at(2, &seen, &done).history_seq, 2);
        let at3 = state_at(3, &seen, &done);
        assert_eq!((at3.status, at3.history_seq), (Status::Running, 3));
        // Event 4 came in the change that ended at 5 (two events, one change).
        assert_eq!(state_at(4, &seen, &done).status, Status::Succeeded);
        assert_eq!(state_at(5, &seen, &done).status, Status::Succeeded);
        // A change this node did not see (another node's, or dropped):
        // the next known state, or the read.
        assert_eq!(
            state_at(3, std::slice::from_ref(&claimed), &done).status,
            Status::Succeeded
        );
        assert_eq!(state_at(3, &[], &done).status, Status::Succeeded);
        // A state newer than the read is not used for an event the read covers.
        let mut later = running("r", 9);
        later.status = Status::Queued;
        assert_eq!(state_at(5, &[Arc::new(later)], &done).history_seq, 5);
    }

    #[test]
    fn last_event_id_is_a_sequence_number() {
        assert_eq!(last_event_id(&HeaderMap::new()).unwrap(), None);
        assert_eq!(last(b"7").unwrap().unwrap(), Some(7));
        assert_eq!(last(b" 12 ").unwrap().unwrap(), Some(12));
        assert_eq!(last(b"").unwrap().unwrap(), None);
        for bad in [&b"-1"[..], b"x", b"1.0", b"18446744073709551616", b"\xff"] {
            let e = last(bad).unwrap().expect_err("refused");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            assert_eq!(e.problem().extensions["field"], "Last-Event-ID");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_header_is_a_number_nothing_or_a_400(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(res) = last(&bytes) {
                match res {
                    Ok(Some(n)) => {
                        let text = String::from_utf8_lossy(&bytes);
                        prop_assert_eq!(text.trim().parse::<u64>().ok(), Some(n));
                    }
                    Ok(None) => prop_assert!(bytes.iter().all(|b| b.is_ascii_whitespace())),
                    Err(e) => prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST),
                }
            }
        }

        #[test]
        fn every_number_round_trips(n in any::<u64>()) {
            prop_assert_eq!(last(n.to_string().as_bytes()).unwrap().unwrap(), Some(n));
        }
    }
}
