//! [`Client`]: one handle on a coatcheck server for submitting requests,
//! waiting for and reading their outcomes, and the raw worker calls.
//!
//! Key decisions:
//! - `Client` is a cheap `Clone` (an `Arc`), safe to share across tasks; it
//!   owns one reqwest connection pool (HTTP/1.1 keep-alive, rustls), so clone
//!   it rather than building new ones.
//! - Constructors validate the base URL up front and return `Result` rather
//!   than panicking.
//! - `wait` is a loop of server-side long-polls (`?wait=N`, at most 50 s each
//!   so that idle-timeout proxies do not cut them), never a timer poll.
//! - With a [journal](crate::journal) configured, a terminal outcome read by
//!   [`Client::wait`], [`Client::result`] or a `200` cancel removes the
//!   request from it; a failure to record that is ignored (the entry stays
//!   pending and the next look at it finds it terminal again).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coatcheck_core::validate;
use coatcheck_core::wire::{
    ClaimBody, ClaimResponse, ClaimedRequest, CompleteBody, FailBody, HeartbeatBody,
    HeartbeatResponse, HistoryResponse, QueuesResponse, SettlementItem, SettlementResult,
    SettlementsBody, SettlementsResponse,
};
use coatcheck_core::{HistoryEvent, Request};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backoff::{retry_after, secs};
use crate::error::{Error, Result};
use crate::http::{self, Replay, Transport};
use crate::journal::{Journal, PendingEntry};
use crate::submit::SubmitBuilder;

/// The longest single long-poll `wait` sends (below common 60 s proxy idle
/// timeouts; the server allows at least 60).
pub(crate) const MAX_POLL: Duration = Duration::from_secs(50);

/// A handle on a coatcheck server. Cheap to clone; share it.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub transport: Transport,
    pub journal: Option<Arc<Journal>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.inner.transport.base)
            .field(
                "api_key",
                &self.inner.transport.api_key.as_ref().map(|_| "…"),
            )
            .field("timeout", &self.inner.transport.timeout)
            .field("retries", &self.inner.transport.retries)
            .field(
                "journal",
                &self.inner.journal.as_ref().map(|j| j.path().to_path_buf()),
            )
            .finish()
    }
}

/// Configures a [`Client`]; see [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    base_url: String,
    api_key: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    retries: u32,
    journal: Option<PathBuf>,
}

impl ClientBuilder {
    /// Sends `Authorization: Bearer <key>` with every call.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// The timeout of one HTTP call (default 30 s). Long-polls get this plus
    /// their wait.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The timeout for opening a connection (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Transport retries per call (default 3): connection errors, and answers
    /// `429/502/503/504` honouring `Retry-After` (up to 60 s), with
    /// exponential backoff and jitter otherwise. `0` disables them.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Keeps a durable [journal](crate::journal) of submitted requests at `path`.
    pub fn journal(mut self, path: impl AsRef<Path>) -> Self {
        self.journal = Some(path.as_ref().to_path_buf());
        self
    }

    /// Builds the client; fails on a base URL that is not `http(s)://…`
    /// without query or fragment, or a journal that cannot be opened.
    pub fn build(self) -> Result<Client> {
        let url = reqwest::Url::parse(&self.base_url)
            .map_err(|e| Error::Invalid(format!("base URL {:?}: {e}", self.base_url)))?;
        if !matches!(url.scheme(), "http" | "https")
            || url.cannot_be_a_base()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(Error::Invalid(format!(
                "base URL {:?}: must be http(s)://host[:port][/path] without query or fragment",
                self.base_url
            )));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("coatcheck-client/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(self.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()?;
        let transport = Transport {
            http,
            base: Transport::base_of(&url),
            api_key: self.api_key,
            timeout: self.timeout,
            retries: self.retries,
        };
        let journal = match self.journal {
            Some(path) => Some(Arc::new(Journal::open(&path)?)),
            None => None,
        };
        Ok(Client {
            inner: Arc::new(Inner { transport, journal }),
        })
    }
}

/// What a cancel did.
#[derive(Debug, Clone)]
#[non_exhaustive]
// Returned once per call and matched by value: boxing would only cost ergonomics.
#[allow(clippy::large_enum_variant)]
pub enum CancelOutcome {
    /// `200`: it was queued and is now `cancelled`.
    Cancelled(Request),
    /// `202`: it is running; `cancel_requested` is set and the worker learns
    /// it on its next heartbeat. It ends `cancelled`, or `succeeded` if the
    /// worker completes first.
    Requested,
}

impl Client {
    /// A client for the server at `base_url` with default settings.
    pub fn new(base_url: impl Into<String>) -> Result<Client> {
        Client::builder(base_url).build()
    }

    /// A builder for a client of the server at `base_url`
    /// (e.g. `http://127.0.0.1:8080`, or with a path prefix behind a proxy).
    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.into(),
            api_key: None,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            retries: 3,
            journal: None,
        }
    }

    /// This client, sharing its connection pool, with a durable
    /// [journal](crate::journal) of submitted requests at `path`.
    pub fn with_journal(self, path: impl AsRef<Path>) -> Result<Client> {
        let journal = Arc::new(Journal::open(path.as_ref())?);
        let transport = self.inner.transport.clone();
        Ok(Client {
            inner: Arc::new(Inner {
                transport,
                journal: Some(journal),
            }),
        })
    }

    pub(crate) fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    pub(crate) fn journal(&self) -> Option<&Arc<Journal>> {
        self.inner.journal.as_ref()
    }

    /// Starts a submit of `input` to `queue`; set options on the builder and
    /// call [`SubmitBuilder::send`]. An `Idempotency-Key` is generated now
    /// (unless you set one) and sent with every transport retry.
    pub fn submit(&self, queue: &str, input: &impl Serialize) -> SubmitBuilder {
        SubmitBuilder::new(self.clone(), queue, input)
    }

    /// `GET /v1/requests/{id}`: the request as it is now.
    pub async fn get(&self, id: &str) -> Result<Request> {
        let t = self.transport();
        let rb = t.request(Method::GET, t.url(&["v1", "requests", id])?, Duration::ZERO);
        http::json(t.send(rb, Replay::Safe).await?).await
    }

    /// Waits until the request is terminal and returns it, long-polling
    /// `GET /v1/requests/{id}?wait=N`. With `overall_timeout`, gives up with
    /// [`Error::Timeout`] once it has passed.
    pub async fn wait(&self, id: &str, overall_timeout: Option<Duration>) -> Result<Request> {
        let t = self.transport();
        let url = t.url(&["v1", "requests", id])?;
        let deadline = overall_timeout.map(|d| Instant::now() + d);
        loop {
            let poll = match deadline {
                Some(dl) => {
                    let left = dl.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Timeout);
                    }
                    left.min(MAX_POLL)
                }
                None => MAX_POLL,
            };
            let started = Instant::now();
            let rb = t
                .request(Method::GET, url.clone(), poll)
                .query(&[("wait", secs(poll).to_string())]);
            let resp = t.send(rb, Replay::Safe).await?;
            let hint = retry_after(resp.headers());
            let req: Request = http::json(resp).await?;
            if req.status.is_terminal() {
                self.forget_quietly(&req.id).await;
                return Ok(req);
            }
            // A server that answers early without a change (or ignores
            // `wait`) must not turn this into a busy loop.
            let took = started.elapsed();
            if took < poll / 2 {
                let mut pause = hint.unwrap_or(Duration::from_secs(1)).min(poll - took);
                if let Some(dl) = deadline {
                    pause = pause.min(dl.saturating_duration_since(Instant::now()));
                }
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// `GET /v1/requests/{id}/result`: the output of a succeeded request as
    /// `T`. Not terminal yet: [`Error::NotReady`]. Failed, cancelled or
    /// expired: [`Error::Api`] with status 409 whose [`Error::request_status`]
    /// and [`Error::request_error`] say how it ended.
    pub async fn result<T: DeserializeOwned>(&self, id: &str) -> Result<T> {
        let t = self.transport();
        let rb = t.request(
            Method::GET,
            t.url(&["v1", "requests", id, "result"])?,
            Duration::ZERO,
        );
        let resp = t.send(rb, Replay::Safe).await?;
        match resp.status().as_u16() {
            200 => {
                let out = http::decode(resp).await;
                if out.is_ok() {
                    self.forget_quietly(id).await;
                }
                out
            }
            202 => Err(Error::NotReady),
            _ => {
                let err = http::api_error(resp).await;
                if err.is_conflict() && err.request_status().is_some_and(|s| s.is_terminal()) {
                    self.forget_quietly(id).await;
                }
                Err(err)
            }
        }
    }

    /// [`Client::wait`] then [`Client::result`]: the output of the request as
    /// `T` once it is terminal, or the 409 error saying how it ended.
    pub async fn wait_result<T: DeserializeOwned>(
        &self,
        id: &str,
        overall_timeout: Option<Duration>,
    ) -> Result<T> {
        self.wait(id, overall_timeout).await?;
        self.result(id).await
    }

    /// `DELETE /v1/requests/{id}`: cancels it (queued: at once; running: the
    /// worker is asked to stop). Terminal already: a 409 [`Error::Api`].
    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome> {
        let t = self.transport();
        let rb = t.request(
            Method::DELETE,
            t.url(&["v1", "requests", id])?,
            Duration::ZERO,
        );
        // A repeated DELETE whose first answer was lost would say 409: only
        // retry when the first never reached the server.
        let resp = t.send(rb, Replay::ConnectOnly).await?;
        match resp.status().as_u16() {
            200 => {
                let req: Request = http::decode(resp).await?;
                self.forget_quietly(&req.id).await;
                Ok(CancelOutcome::Cancelled(req))
            }
            202 => Ok(CancelOutcome::Requested),
            _ => Err(http::unexpected(resp).await),
        }
    }

    /// `GET /v1/requests/{id}/history`: its timeline, oldest first.
    pub async fn history(&self, id: &str) -> Result<Vec<HistoryEvent>> {
        let t = self.transport();
        let rb = t.request(
            Method::GET,
            t.url(&["v1", "requests", id, "history"])?,
            Duration::ZERO,
        );
        let body: HistoryResponse = http::json(t.send(rb, Replay::Safe).await?).await?;
        Ok(body.events)
    }

    /// `POST /v1/requests/{id}/redrive` (admin): puts a failed, cancelled or
    /// expired request back to `queued` with fresh attempts.
    pub async fn redrive(&self, id: &str) -> Result<Request> {
        let t = self.transport();
        let rb = t.request(
            Method::POST,
            t.url(&["v1", "requests", id, "redrive"])?,
            Duration::ZERO,
        );
        // Repeating a redrive that landed would answer 409.
        http::json(t.send(rb, Replay::ConnectOnly).await?).await
    }

    /// `GET /v1/queues` (admin): counts and rates per queue.
    pub async fn queues(&self) -> Result<QueuesResponse> {
        let t = self.transport();
        let rb = t.request(Method::GET, t.url(&["v1", "queues"])?, Duration::ZERO);
        http::json(t.send(rb, Replay::Safe).await?).await
    }

    /// `POST /v1/queues/{queue}/claims`: long-polls for up to `body.max`
    /// ready requests, now leased to `body.worker_id`. Possibly empty.
    pub async fn claim(&self, queue: &str, body: ClaimBody) -> Result<Vec<ClaimedRequest>> {
        check_queue(queue)?;
        let t = self.transport();
        let wait = duration_arg("wait", body.wait)?;
        let rb = t
            .request(
                Method::POST,
                t.url(&["v1", "queues", queue, "claims"])?,
                wait,
            )
            .json(&body);
        // A claim whose answer was lost leaves its requests leased to nobody
        // until the lease runs out: never repeat one that reached the server.
        let resp: ClaimResponse = http::json(t.send(rb, Replay::ConnectOnly).await?).await?;
        Ok(resp.requests)
    }

    /// `POST /v1/requests/{id}/heartbeat`: renews the lease and records
    /// progress; the answer says whether a cancel was requested.
    pub async fn heartbeat(&self, id: &str, body: HeartbeatBody) -> Result<HeartbeatResponse> {
        let t = self.transport();
        let rb = t
            .request(
                Method::POST,
                t.url(&["v1", "requests", id, "heartbeat"])?,
                Duration::ZERO,
            )
            .json(&body);
        http::json(t.send(rb, Replay::Safe).await?).await
    }

    /// `POST /v1/requests/{id}/complete` with the lease token and the output.
    /// Completing twice with the current token is idempotent.
    pub async fn complete(
        &self,
        id: &str,
        lease_token: &str,
        output: &impl Serialize,
    ) -> Result<Request> {
        let output = serde_json::value::to_raw_value(output)
            .map_err(|e| Error::Invalid(format!("output does not serialize: {e}")))?;
        let body = CompleteBody {
            lease_token: lease_token.to_string(),
            output,
        };
        let t = self.transport();
        let rb = t
            .request(
                Method::POST,
                t.url(&["v1", "requests", id, "complete"])?,
                Duration::ZERO,
            )
            .json(&body);
        http::json(t.send(rb, Replay::Safe).await?).await
    }

    /// `POST /v1/requests/{id}/fail`: the request goes back to `queued`
    /// (retryable, attempts left), to `failed`, or to `cancelled` if a cancel
    /// was requested.
    pub async fn fail(&self, id: &str, body: FailBody) -> Result<Request> {
        duration_arg("retry_after", body.retry_after)?;
        let t = self.transport();
        let rb = t
            .request(
                Method::POST,
                t.url(&["v1", "requests", id, "fail"])?,
                Duration::ZERO,
            )
            .json(&body);
        // A repeated fail after a lost answer gets a harmless 409 (fenced).
        http::json(t.send(rb, Replay::Safe).await?).await
    }

    /// `POST /v1/queues/{queue}/settlements`: completes and fails up to 100
    /// requests in one durable commit; one result per item, same order.
    pub async fn settle(
        &self,
        queue: &str,
        items: Vec<SettlementItem>,
    ) -> Result<Vec<SettlementResult>> {
        self.settle_with(queue, items, false).await
    }

    /// [`Client::settle`] with `Prefer: return=minimal`: each result leaves
    /// the request out and carries only its `request_status` (a server that
    /// ignores the preference sends the request too). Cheaper for both sides
    /// when outputs are large; the worker runtime settles this way.
    pub async fn settle_minimal(
        &self,
        queue: &str,
        items: Vec<SettlementItem>,
    ) -> Result<Vec<SettlementResult>> {
        self.settle_with(queue, items, true).await
    }

    async fn settle_with(
        &self,
        queue: &str,
        items: Vec<SettlementItem>,
        minimal: bool,
    ) -> Result<Vec<SettlementResult>> {
        check_queue(queue)?;
        if items.is_empty() || items.len() > 100 {
            return Err(Error::Invalid(format!(
                "settlements take 1..100 items, not {}",
                items.len()
            )));
        }
        let t = self.transport();
        let body = SettlementsBody { items };
        let mut rb = t
            .request(
                Method::POST,
                t.url(&["v1", "queues", queue, "settlements"])?,
                Duration::ZERO,
            )
            .json(&body);
        if minimal {
            rb = rb.header("prefer", "return=minimal");
        }
        let resp: SettlementsResponse = http::json(t.send(rb, Replay::Safe).await?).await?;
        if resp.items.len() != body.items.len() {
            return Err(Error::Decode(format!(
                "settlements answered {} results for {} items",
                resp.items.len(),
                body.items.len()
            )));
        }
        Ok(resp.items)
    }

    /// The requests submitted through this client's journal that are not
    /// finished as far as it knows, oldest first — also those submitted
    /// before a restart. An entry without `id` is a submit whose answer never
    /// arrived (see [`PendingEntry`]). Without a journal: [`Error::Journal`].
    pub fn pending(&self) -> Result<Vec<PendingEntry>> {
        Ok(self.require_journal()?.pending())
    }

    /// Removes a request from the journal (by its id, or for an entry without
    /// one, by its idempotency key). Returns whether it was there.
    pub async fn forget(&self, id: &str) -> Result<bool> {
        let journal = self.require_journal()?.clone();
        if !journal.contains(id) {
            return Ok(false);
        }
        let id = id.to_string();
        run_blocking(move || journal.forget(&id)).await
    }

    fn require_journal(&self) -> Result<&Arc<Journal>> {
        self.journal().ok_or_else(|| {
            Error::Journal("this client has no journal (see ClientBuilder::journal)".into())
        })
    }

    /// Forgets `id` if it is journaled; ignores failures (module docs).
    pub(crate) async fn forget_quietly(&self, id: &str) {
        if let Some(journal) = self.journal() {
            if journal.contains(id) {
                let journal = journal.clone();
                let id = id.to_string();
                let _ = run_blocking(move || journal.forget(&id)).await;
            }
        }
    }
}

/// Runs blocking journal I/O off the async threads.
pub(crate) async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Journal(format!("journal task failed: {e}")))?
}

pub(crate) fn check_queue(queue: &str) -> Result<()> {
    validate::name("queue", queue).map_err(|e| Error::Invalid(e.to_string()))
}

/// A duration argument in seconds, checked as the server would.
fn duration_arg(field: &str, secs: Option<f64>) -> Result<Duration> {
    Ok(validate::opt_duration(field, secs)
        .map_err(|e| Error::Invalid(e.to_string()))?
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_is_checked() {
        assert!(Client::new("http://127.0.0.1:8080").is_ok());
        assert!(Client::new("https://example.com/prefix/").is_ok());
        for bad in [
            "",
            "127.0.0.1:8080",
            "ftp://x",
            "http://x/?q=1",
            "http://x/#f",
            "mailto:a@b",
        ] {
            assert!(matches!(Client::new(bad), Err(Error::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn debug_hides_the_key() {
        let c = Client::builder("http://x")
            .api_key("sekrit")
            .build()
            .unwrap();
        let s = format!("{c:?}");
        assert!(!s.contains("sekrit"), "{s}");
    }

    #[test]
    fn pending_needs_a_journal() {
        let c = Client::new("http://x").unwrap();
        assert!(matches!(c.pending(), Err(Error::Journal(_))));
    }
}
