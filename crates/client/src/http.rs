//! The HTTP layer under [`crate::Client`]: URLs, auth, per-call timeouts,
//! transport retries and turning answers into values or [`Error`]s.
//!
//! Key decisions:
//! - A call is built once into a `reqwest::Request` and *cloned* for every
//!   retry, so every header — above all the submit's `Idempotency-Key` — is
//!   byte-identical across retries by construction.
//! - What is retried depends on the call ([`Replay`]): a connection that could
//!   not be opened never reached the server, so every call may retry it; an
//!   exchange that broke midway is retried only for calls that are safe to
//!   repeat (reads, submit with its idempotency key, heartbeat, complete, …),
//!   not for a claim, whose lost answer would strand leased requests.
//!   `502/503/504/429` are retried for every call, honouring `Retry-After`.
//! - Path segments are percent-encoded here, strictly (everything but RFC 3986
//!   unreserved characters), and `.`/`..`/empty segments are refused: URL
//!   normalisation would otherwise turn an id of `..` into another route.
//! - A long-poll gets a per-call timeout of the configured timeout *plus* its
//!   wait, so the client never gives up on a poll the server is still holding.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

use crate::backoff::{retry_after, Backoff, MAX_RETRY_AFTER};
use crate::error::{Error, Result};

/// Whether a call may be repeated after an exchange that broke midway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// Repeating it cannot do harm (reads, idempotent or fenced writes).
    Safe,
    /// Only retried when the connection could not even be opened.
    ConnectOnly,
}

/// Connection settings shared by every call of a client.
#[derive(Debug, Clone)]
pub(crate) struct Transport {
    pub http: reqwest::Client,
    /// The base URL, parsed once (a path prefix, if any, without a
    /// trailing slash).
    pub base: reqwest::Url,
    pub api_key: Option<String>,
    pub timeout: Duration,
    pub retries: u32,
}

impl Transport {
    /// The URL of `segments` under the base URL, each one percent-encoded.
    /// Only the path is built per call: the parsed base is copied, so the
    /// host is not parsed (and IDNA-mapped) again on every call.
    pub fn url(&self, segments: &[&str]) -> Result<reqwest::Url> {
        let mut path = self.base.path().trim_end_matches('/').to_string();
        for seg in segments {
            if seg.is_empty() || *seg == "." || *seg == ".." {
                return Err(Error::Invalid(format!("{seg:?} cannot be a path segment")));
            }
            path.push('/');
            encode_segment(seg, &mut path);
        }
        let mut url = self.base.clone();
        url.set_path(&path);
        Ok(url)
    }

    /// The (already checked) base URL as a transport keeps it: its path
    /// prefix without a trailing slash.
    pub fn base_of(url: &reqwest::Url) -> reqwest::Url {
        let mut base = url.clone();
        let prefix = base.path().trim_end_matches('/').to_string();
        base.set_path(&prefix);
        base
    }

    /// A request to `url` with auth and a per-call timeout of the configured
    /// one plus `extra` (a long-poll's wait).
    pub fn request(&self, method: Method, url: reqwest::Url, extra: Duration) -> RequestBuilder {
        let mut rb = self
            .http
            .request(method, url)
            .timeout(self.timeout.saturating_add(extra))
            .header(
                reqwest::header::ACCEPT,
                "application/json, application/problem+json",
            );
        if let Some(key) = &self.api_key {
            rb = rb.bearer_auth(key);
        }
        rb
    }

    /// Sends `req`, retrying per [`Replay`] and the configured retry count.
    /// Returns the last answer whatever its status; only the exchange failing
    /// is an error here.
    pub async fn execute(&self, req: reqwest::Request, replay: Replay) -> Result<Response> {
        let mut attempt = 0u32;
        loop {
            let this = req
                .try_clone()
                .ok_or_else(|| Error::Invalid("a streaming body cannot be retried".into()))?;
            let last = attempt >= self.retries;
            match self.http.execute(this).await {
                Ok(resp) => {
                    if last || !retryable_status(resp.status()) {
                        return Ok(resp);
                    }
                    let wait = match retry_after(resp.headers()) {
                        Some(d) if d > MAX_RETRY_AFTER => return Ok(resp),
                        Some(d) => d,
                        None => Backoff::TRANSPORT.jittered(attempt),
                    };
                    drop(resp);
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    if last || !retryable_error(&e, replay) {
                        return Err(Error::Transport(e));
                    }
                    tokio::time::sleep(Backoff::TRANSPORT.jittered(attempt)).await;
                }
            }
            attempt += 1;
        }
    }

    /// Builds and sends `rb`.
    pub async fn send(&self, rb: RequestBuilder, replay: Replay) -> Result<Response> {
        self.execute(rb.build()?, replay).await
    }
}

/// Answers worth another try for any call: the server (or a gateway in front
/// of it) said it could not take the call right now.
fn retryable_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 429 | 502 | 503 | 504)
}

fn retryable_error(e: &reqwest::Error, replay: Replay) -> bool {
    if e.is_builder() || e.is_redirect() || e.is_decode() {
        return false;
    }
    match replay {
        Replay::Safe => true,
        Replay::ConnectOnly => e.is_connect(),
    }
}

/// Appends `seg` percent-encoded: RFC 3986 unreserved characters pass, every
/// other byte becomes `%XX`.
pub(crate) fn encode_segment(seg: &str, out: &mut String) {
    for b in seg.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// The body of a 2xx answer as `T`, or the answer as an [`Error::Api`].
pub(crate) async fn json<T: DeserializeOwned>(resp: Response) -> Result<T> {
    if !resp.status().is_success() {
        return Err(api_error(resp).await);
    }
    decode(resp).await
}

/// The body of an answer as `T`, whatever its status.
pub(crate) async fn decode<T: DeserializeOwned>(resp: Response) -> Result<T> {
    let url = resp.url().path().to_string();
    let bytes = resp.bytes().await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Decode(format!("answer of {url}: {e}")))
}

/// A non-2xx answer as an [`Error::Api`].
pub(crate) async fn api_error(resp: Response) -> Error {
    let status = resp.status().as_u16();
    match resp.bytes().await {
        Ok(body) => Error::from_body(status, &body),
        Err(e) => Error::Api {
            status,
            problem: crate::error::synthetic_problem(
                status,
                format!("the body of the {status} answer could not be read: {e}"),
            ),
        },
    }
}

/// An answer with no status this call knows about.
pub(crate) async fn unexpected(resp: Response) -> Error {
    if resp.status().is_success() {
        Error::Decode(format!("unexpected status {}", resp.status()))
    } else {
        api_error(resp).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(base: &str) -> Transport {
        Transport {
            http: reqwest::Client::new(),
            base: Transport::base_of(&reqwest::Url::parse(base).unwrap()),
            api_key: None,
            timeout: Duration::from_secs(1),
            retries: 0,
        }
    }

    #[test]
    fn encodes_path_segments_strictly() {
        let t = transport("http://localhost:8080/");
        let u = t.url(&["v1", "requests", "a/b?c#d%e f"]).unwrap();
        assert_eq!(
            u.as_str(),
            "http://localhost:8080/v1/requests/a%2Fb%3Fc%23d%25e%20f"
        );
        let u = t.url(&["v1", "requests", "ä\\x"]).unwrap();
        assert_eq!(u.path(), "/v1/requests/%C3%A4%5Cx");
        let u = t.url(&["v1", "requests", "%2e%2E"]).unwrap();
        assert_eq!(u.path(), "/v1/requests/%252e%252E");
        for bad in ["", ".", ".."] {
            assert!(
                matches!(t.url(&["v1", "requests", bad]), Err(Error::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn keeps_a_base_path() {
        for base in [
            "https://example.com/coatcheck/",
            "https://example.com/coatcheck",
        ] {
            let t = transport(base);
            let u = t.url(&["v1", "queues"]).unwrap();
            assert_eq!(u.as_str(), "https://example.com/coatcheck/v1/queues");
            // The same transport builds every call's URL afresh from its base.
            let u = t.url(&["v1", "requests", "r 1"]).unwrap();
            assert_eq!(
                u.as_str(),
                "https://example.com/coatcheck/v1/requests/r%201"
            );
        }
        let t = transport("http://[::1]:8080");
        assert_eq!(
            t.url(&["healthz"]).unwrap().as_str(),
            "http://[::1]:8080/healthz"
        );
    }

    #[test]
    fn per_call_timeout_includes_the_wait() {
        let t = transport("http://localhost");
        let req = t
            .request(Method::GET, t.url(&["x"]).unwrap(), Duration::from_secs(30))
            .build()
            .unwrap();
        assert_eq!(req.timeout(), Some(&Duration::from_secs(31)));
    }
}
