//! Following one request as it changes: [`Client::events`], a stream over
//! `GET /v1/requests/{id}/events` (Server-Sent Events) that resumes by
//! itself after a dropped connection.
//!
//! ```
//! use futures::StreamExt;
//! use coatcheck_client::{Client, RequestEventKind, Status};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> coatcheck_client::Result<()> {
//! # let server = coatcheck_testkit::TestServer::start().await;
//! # let url = server.base_url();
//! let client = Client::new(url)?;
//! let ticket = client.submit("thumbnails", &"cat.png").send().await?;
//! # let worker = {
//! #     let c = client.clone();
//! #     tokio::spawn(async move {
//! #         use coatcheck_client::wire::{ClaimBody, HeartbeatBody};
//! #         let body = ClaimBody { worker_id: "w".into(), max: Some(1), lease: None, wait: Some(5.0) };
//! #         let job = c.claim("thumbnails", body).await.unwrap().remove(0);
//! #         let progress = Some(serde_json::value::to_raw_value(&50).unwrap());
//! #         let hb = HeartbeatBody { lease_token: job.lease_token.clone(), progress, extend: None };
//! #         c.heartbeat(&job.id, hb).await.unwrap();
//! #         c.complete(&job.id, &job.lease_token, &"cat-128.png").await.unwrap();
//! #     })
//! # };
//!
//! let mut events = client.events(ticket.id());
//! let mut last = None;
//! while let Some(event) = events.next().await {
//!     let event = event?;
//!     if event.kind == RequestEventKind::Progress {
//!         println!("progress: {:?}", event.request.progress);
//!     }
//!     last = Some(event.request);
//! }
//! // The stream ended after the terminal event.
//! assert_eq!(last.unwrap().status, Status::Succeeded);
//! # worker.await.unwrap();
//! # Ok(()) }
//! ```
//!
//! Key decisions:
//! - **Resume**: the stream remembers the `id:` of the last event and, when
//!   the connection drops (reset, server restart, proxy idle timeout, no byte
//!   for [`IDLE_TIMEOUT`] although the server sends keep-alives), reconnects
//!   with `Last-Event-ID`, so the server replays exactly what came after it:
//!   nothing is missed and nothing is yielded twice.
//! - **Reconnects** back off exponentially with jitter (200 ms … 10 s,
//!   honouring `Retry-After`) on transport failures and `429`/`5xx`; after
//!   [`MAX_RECONNECTS`] attempts in a row that brought no byte (about a
//!   minute; see [`RequestEvents::max_reconnects`]) the stream yields the
//!   last error and ends. Any other error
//!   (`404`, `401`, …) is yielded at once and ends the stream.
//! - **The end**: after an event whose request is terminal, the stream yields
//!   what the server already sent and ends with the connection (the server
//!   closes it after the terminal event) without reconnecting. A `204` (the
//!   stream was resumed past the terminal event) ends it with nothing more.
//! - Seeing the terminal state counts as consuming the reply for the
//!   [journal](crate::journal), as [`Client::wait`] does.
//! - Events the SDK does not know (a newer server) are skipped, not errors.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use coatcheck_core::Request;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::StatusCode;

use crate::backoff::{retry_after, Backoff, MAX_RETRY_AFTER};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::http;
use crate::sse::{Parser, SseEvent};

/// A connection that brings no byte for this long is taken as dropped and
/// resumed (the server sends a keep-alive comment every 15 s by default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Reconnect attempts in a row, none of which brought a byte, before the
/// stream gives up with the last error.
pub const MAX_RECONNECTS: u32 = 10;

/// After the terminal event, how long to wait for the server to close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What kind of change an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestEventKind {
    /// `event: status`: the status (or anything but progress) changed; the
    /// first event of a fresh stream is also one, with the current state.
    Status,
    /// `event: progress`: a worker reported progress.
    Progress,
}

/// One event of a request's stream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RequestEvent {
    /// Status or progress.
    pub kind: RequestEventKind,
    /// The history sequence number of the change (the SSE `id:`); pass it to
    /// [`Client::events_after`] to resume after it.
    pub seq: u64,
    /// The request as it is after the change.
    pub request: Request,
}

impl RequestEvent {
    /// Whether the request is terminal in this event (the stream ends after it).
    pub fn is_terminal(&self) -> bool {
        self.request.status.is_terminal()
    }
}

/// The stream [`Client::events`] returns: `Unpin`, `Send`, `'static`.
#[must_use = "streams do nothing unless polled"]
pub struct RequestEvents {
    /// The state until the first poll (so that it can still be configured).
    unstarted: Option<State>,
    inner: Option<BoxStream<'static, Result<RequestEvent>>>,
}

impl RequestEvents {
    /// How many reconnect attempts in a row (none bringing a byte) are made
    /// before the stream gives up with the last error (default
    /// [`MAX_RECONNECTS`]); `0` gives up at the first failure. Takes effect
    /// only before the stream is first polled.
    pub fn max_reconnects(mut self, n: u32) -> Self {
        if let Some(s) = &mut self.unstarted {
            s.session.max_reconnects = n;
        }
        self
    }
}

impl std::fmt::Debug for RequestEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestEvents")
            .field("started", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

impl Stream for RequestEvents {
    type Item = Result<RequestEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.inner.is_none() {
            let Some(state) = self.unstarted.take() else {
                return Poll::Ready(None);
            };
            self.inner = Some(
                futures::stream::unfold(state, |mut s| async move {
                    let item = s.next().await?;
                    Some((item, s))
                })
                .boxed(),
            );
        }
        match self.inner.as_mut() {
            Some(inner) => inner.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }
}

impl Client {
    /// The request's events as they happen, from its current state on: the
    /// first event is a `status` event with the request as it is now; the
    /// stream ends after the terminal one (module docs for resume and errors).
    pub fn events(&self, id: &str) -> RequestEvents {
        self.events_from(id, None)
    }

    /// The request's events after the one numbered `last_seq` (as
    /// `Last-Event-ID` does): how a consumer that stopped picks up where it
    /// left off. Already past the terminal event: the stream is empty.
    pub fn events_after(&self, id: &str, last_seq: u64) -> RequestEvents {
        self.events_from(id, Some(last_seq))
    }

    fn events_from(&self, id: &str, last: Option<u64>) -> RequestEvents {
        let state = State {
            client: self.clone(),
            id: id.to_string(),
            last,
            session: Session::new(self.clone(), id.to_string()),
            pending: VecDeque::new(),
            terminal: false,
        };
        RequestEvents {
            unstarted: Some(state),
            inner: None,
        }
    }
}

/// An open event stream.
struct Conn {
    resp: reqwest::Response,
    parser: Parser,
    /// No byte has arrived on it yet.
    fresh: bool,
}

/// What one read of an event stream brought.
enum Read {
    /// Bytes arrived (the connection works), with the events they completed.
    Events(Vec<SseEvent>),
    /// The connection dropped, closed, or was silent for longer than asked;
    /// `fresh` if it never brought a byte.
    Dropped { fresh: bool },
}

impl Conn {
    /// The next bytes, waiting at most `idle`; an error only for bytes that
    /// are not Server-Sent Events.
    async fn read(&mut self, idle: Duration) -> Result<Read> {
        loop {
            let chunk = match tokio::time::timeout(idle, self.resp.chunk()).await {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Err(_)) | Ok(Ok(None)) | Err(_) => {
                    return Ok(Read::Dropped { fresh: self.fresh })
                }
            };
            if chunk.is_empty() {
                continue;
            }
            self.fresh = false;
            let mut events = Vec::new();
            self.parser
                .feed(&chunk, &mut events)
                .map_err(Error::Decode)?;
            return Ok(Read::Events(events));
        }
    }
}

enum Connected {
    Open(Box<Conn>),
    /// `204`: nothing more will come.
    Finished,
}

/// One event stream kept open: opened when first read, reopened when it
/// drops (module docs for what is retried and for how long).
pub(crate) struct Session {
    client: Client,
    /// What the stream is of, for errors ("request …", "channel …").
    what: String,
    conn: Option<Conn>,
    /// Failed attempts in a row (reset by any byte).
    failures: u32,
    pub(crate) max_reconnects: u32,
    /// Nothing more will be read: the stream ended or failed.
    ended: bool,
}

impl Session {
    pub(crate) fn new(client: Client, what: String) -> Session {
        Session {
            client,
            what,
            conn: None,
            failures: 0,
            max_reconnects: MAX_RECONNECTS,
            ended: false,
        }
    }

    /// The next events (possibly none: a keep-alive) of the stream at `url`
    /// (asked for only when the stream must be opened; resuming after
    /// `last_event_id`), waiting at most `idle` for a byte. A dropped stream
    /// is reopened, unless `reopen` is false. `None` once the stream ended
    /// (`204`, or dropped and not to be reopened) or after an error.
    pub(crate) async fn next(
        &mut self,
        url: impl Fn() -> Result<reqwest::Url>,
        last_event_id: Option<&str>,
        idle: Duration,
        reopen: bool,
    ) -> Option<Result<Vec<SseEvent>>> {
        if self.ended {
            return None;
        }
        let got = self.read(url, last_event_id, idle, reopen).await;
        if !matches!(got, Ok(Some(_))) {
            self.end();
        }
        got.transpose()
    }

    async fn read(
        &mut self,
        url: impl Fn() -> Result<reqwest::Url>,
        last_event_id: Option<&str>,
        idle: Duration,
        reopen: bool,
    ) -> Result<Option<Vec<SseEvent>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                match self.open(url()?, last_event_id).await? {
                    Connected::Open(c) => self.conn = Some(*c),
                    Connected::Finished => return Ok(None),
                }
                continue;
            };
            match conn.read(idle).await? {
                Read::Events(events) => {
                    self.failures = 0;
                    return Ok(Some(events));
                }
                Read::Dropped { fresh } => {
                    self.conn = None;
                    if !reopen {
                        return Ok(None);
                    }
                    if fresh {
                        // Opened and closed without a byte: that counts as a
                        // failed attempt, or a broken server would spin us.
                        if self.failures >= self.max_reconnects {
                            return Err(Error::Interrupted(format!(
                                "the event stream of {} keeps closing without sending anything",
                                self.what
                            )));
                        }
                        self.failures += 1;
                    }
                }
            }
        }
    }

    /// Ends the stream: nothing more is read.
    pub(crate) fn end(&mut self) {
        self.conn = None;
        self.ended = true;
    }

    /// Opens the event stream at `url`, retrying transport failures,
    /// timeouts, `429` and `5xx` with backoff while the failures in a row
    /// stay within `max_reconnects`; any other answer is an error at once.
    async fn open(&mut self, url: reqwest::Url, last_event_id: Option<&str>) -> Result<Connected> {
        let t = self.client.transport();
        loop {
            if self.failures > 0 {
                let pause = Backoff::WORKER.jittered(self.failures - 1);
                tokio::time::sleep(pause).await;
            }
            let mut rb = t.http.get(url.clone()).header(ACCEPT, "text/event-stream");
            if let Some(key) = &t.api_key {
                rb = rb.bearer_auth(key);
            }
            if let Some(last) = last_event_id {
                rb = rb.header("Last-Event-ID", last);
            }
            // No overall timeout on the body (it is long-lived); the headers
            // must come within the call timeout.
            let answer = tokio::time::timeout(t.timeout, rb.send()).await;
            let error = match answer {
                Ok(Ok(resp)) => match resp.status() {
                    StatusCode::OK => {
                        if !is_event_stream(resp.headers().get(CONTENT_TYPE)) {
                            return Err(Error::Decode(format!(
                                "{} answered 200 but not with text/event-stream",
                                resp.url().path()
                            )));
                        }
                        return Ok(Connected::Open(Box::new(Conn {
                            resp,
                            parser: Parser::new(),
                            fresh: true,
                        })));
                    }
                    StatusCode::NO_CONTENT => return Ok(Connected::Finished),
                    _ => {
                        let hint = retry_after(resp.headers());
                        let err = http::unexpected(resp).await;
                        if !err.is_transient() || self.failures >= self.max_reconnects {
                            return Err(err);
                        }
                        if let Some(wait) = hint.filter(|w| *w <= MAX_RETRY_AFTER) {
                            tokio::time::sleep(wait).await;
                        }
                        err
                    }
                },
                Ok(Err(e)) => Error::Transport(e),
                Err(_) => Error::Timeout,
            };
            if !error.is_transient() && !matches!(error, Error::Timeout) {
                return Err(error);
            }
            if self.failures >= self.max_reconnects {
                return Err(error);
            }
            self.failures += 1;
        }
    }
}

struct State {
    client: Client,
    id: String,
    last: Option<u64>,
    session: Session,
    pending: VecDeque<RequestEvent>,
    terminal: bool,
}

impl State {
    async fn next(&mut self) -> Option<Result<RequestEvent>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                if ev.is_terminal() && !self.terminal {
                    self.terminal = true;
                    self.client.forget_quietly(&self.id).await;
                }
                return Some(Ok(ev));
            }
            // After the terminal event, wait only for the server to close.
            let idle = if self.terminal {
                CLOSE_WAIT
            } else {
                IDLE_TIMEOUT
            };
            let last = self.last.map(|l| l.to_string());
            let url = || {
                self.client
                    .transport()
                    .url(&["v1", "requests", &self.id, "events"])
            };
            let events = match self
                .session
                .next(url, last.as_deref(), idle, !self.terminal)
                .await?
            {
                Ok(events) => events,
                Err(e) => return Some(Err(e)),
            };
            for e in events {
                match self.decode(e) {
                    Ok(Some(ev)) => {
                        self.last = Some(ev.seq);
                        self.pending.push_back(ev);
                    }
                    Ok(None) => {}
                    Err(err) => {
                        // What came before it is still good.
                        self.session.end();
                        self.pending.clear();
                        return Some(Err(err));
                    }
                }
            }
        }
    }

    fn decode(&self, e: SseEvent) -> Result<Option<RequestEvent>> {
        let kind = match e.event.as_str() {
            "status" => RequestEventKind::Status,
            "progress" => RequestEventKind::Progress,
            _ => return Ok(None),
        };
        let seq = e
            .id
            .as_deref()
            .and_then(|id| id.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::Decode(format!("event {:?} without a numeric id", e.event)))?;
        let request: Request = serde_json::from_str(&e.data)
            .map_err(|err| Error::Decode(format!("event #{seq} of {}: {err}", self.id)))?;
        Ok(Some(RequestEvent { kind, seq, request }))
    }
}

fn is_event_stream(v: Option<&HeaderValue>) -> bool {
    v.and_then(|v| v.to_str().ok())
        .and_then(|s| s.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
}
