//! Submitting a request: [`SubmitBuilder`] (every option of
//! `POST /v1/queues/{queue}/requests`) and what comes back, [`Submitted`].
//!
//! Key decisions:
//! - **Every submit carries an `Idempotency-Key`**: a UUIDv7 (time-ordered,
//!   so the server's key index grows at one end) generated when the builder
//!   is made (or one you set). The HTTP request is built once and
//!   cloned for each transport retry, so a submit whose answer was lost and
//!   that is sent again is recognised by the server as the same one: a retried
//!   submit never creates a second request.
//! - The input is serialized once, when the builder is made; a value that does
//!   not serialize surfaces as [`Error::Invalid`] from `send`.
//! - With a [journal](crate::journal), `send` records the submit *before* it
//!   goes out (queue, correlation id, key) and its id once accepted, each
//!   fsync'd, so a crash at any point leaves a trace to resume from. A
//!   definite refusal (`4xx`) removes the record; a lost answer keeps it. A
//!   request already terminal in the answer (`Prefer: wait`) is not kept.

use std::collections::BTreeMap;
use std::time::Duration;

use coatcheck_core::wire::{null_raw, SubmitBody};
use coatcheck_core::{ReplyTo, Request};
use reqwest::Method;
use serde::Serialize;

use crate::backoff::secs;
use crate::client::{check_queue, run_blocking, Client};
use crate::error::{Error, Result};
use crate::http::{self, Replay};

/// What a submit returned.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Submitted {
    /// The request as the server stored it (terminal already if `terminal`).
    pub request: Request,
    /// The server answered with an existing request for the same
    /// `Idempotency-Key` (`Idempotent-Replayed: true`); nothing new was made.
    pub replayed: bool,
    /// The request is already terminal (e.g. it finished within
    /// [`SubmitBuilder::prefer_wait`]): no need to wait for it.
    pub terminal: bool,
    /// The `Idempotency-Key` that was sent.
    pub idempotency_key: String,
}

impl Submitted {
    /// The request id.
    pub fn id(&self) -> &str {
        &self.request.id
    }
}

/// A submit being prepared; see [`Client::submit`].
#[derive(Debug)]
#[must_use = "a submit does nothing until `.send().await`"]
pub struct SubmitBuilder {
    client: Client,
    queue: String,
    body: SubmitBody,
    input_error: Option<String>,
    idempotency_key: String,
    prefer_wait: Option<Duration>,
}

impl SubmitBuilder {
    pub(crate) fn new(client: Client, queue: &str, input: &impl Serialize) -> Self {
        let (input, input_error) = match serde_json::value::to_raw_value(input) {
            Ok(raw) => (raw, None),
            Err(e) => (null_raw(), Some(format!("input does not serialize: {e}"))),
        };
        SubmitBuilder {
            client,
            queue: queue.to_string(),
            body: SubmitBody {
                input,
                correlation_id: None,
                priority: None,
                delay: None,
                timeout: None,
                max_attempts: None,
                reply_to: None,
                metadata: None,
                fallback_queue: None,
                fairness_key: None,
            },
            input_error,
            // Time-ordered (UUIDv7), so that the store's unique index on
            // keys grows at its right edge instead of at a random page per
            // submit: fewer pages written per commit, on both stores.
            idempotency_key: uuid::Uuid::now_v7().to_string(),
            prefer_wait: None,
        }
    }

    /// Your own id for this request, echoed in every reply.
    pub fn correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.body.correlation_id = Some(correlation_id.into());
        self
    }

    /// Higher runs first (default 0).
    pub fn priority(mut self, priority: i32) -> Self {
        self.body.priority = Some(priority);
        self
    }

    /// Not claimable before this much time has passed.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.body.delay = Some(secs(delay));
        self
    }

    /// Sets the request's deadline this far from now; it expires if not
    /// finished by then. (Not an HTTP timeout: see [`crate::ClientBuilder::timeout`].)
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.body.timeout = Some(secs(timeout));
        self
    }

    /// Attempts before it is dead-lettered (server default 3).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.body.max_attempts = Some(max_attempts);
        self
    }

    /// Where the reply goes when it is terminal.
    pub fn reply_to(mut self, reply_to: ReplyTo) -> Self {
        self.body.reply_to = Some(reply_to);
        self
    }

    /// Adds one metadata entry (string → string, for your own bookkeeping).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.body
            .metadata
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    /// On dead-letter, resubmit the same input to this queue.
    pub fn fallback_queue(mut self, queue: impl Into<String>) -> Self {
        self.body.fallback_queue = Some(queue.into());
        self
    }

    /// Claims rotate across fairness keys (default: the tenant).
    pub fn fairness_key(mut self, key: impl Into<String>) -> Self {
        self.body.fairness_key = Some(key.into());
        self
    }

    /// Uses this `Idempotency-Key` instead of a generated one — e.g. the key
    /// of a [`crate::PendingEntry`] whose answer never arrived, to learn what
    /// became of it (same key, same body: the existing request).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = key.into();
        self
    }

    /// Asks the server to hold the answer up to `wait` (`Prefer: wait=N`,
    /// whole seconds, rounded up) and answer with the terminal request if it
    /// finishes by then.
    pub fn prefer_wait(mut self, wait: Duration) -> Self {
        self.prefer_wait = Some(wait);
        self
    }

    /// The `Idempotency-Key` this submit sends.
    pub fn key(&self) -> &str {
        &self.idempotency_key
    }

    fn prefer_wait_secs(&self) -> Option<u64> {
        self.prefer_wait
            .map(|w| w.as_secs() + u64::from(w.subsec_nanos() > 0))
    }

    /// The HTTP request, exactly as every (re)try sends it.
    pub(crate) fn build(&self) -> Result<reqwest::Request> {
        if let Some(e) = &self.input_error {
            return Err(Error::Invalid(e.clone()));
        }
        check_queue(&self.queue)?;
        let t = self.client.transport();
        let url = t.url(&["v1", "queues", &self.queue, "requests"])?;
        let wait = self.prefer_wait_secs();
        let extra = Duration::from_secs(wait.unwrap_or(0));
        let mut rb = t
            .request(Method::POST, url, extra)
            .header("Idempotency-Key", &self.idempotency_key)
            .json(&self.body);
        if let Some(w) = wait {
            rb = rb.header("Prefer", format!("wait={w}"));
        }
        Ok(rb.build()?)
    }

    /// Sends the submit (retrying transport failures with the same key).
    pub async fn send(self) -> Result<Submitted> {
        let req = self.build()?;
        let journal = self.client.journal().cloned();
        let key = self.idempotency_key.clone();
        if let Some(j) = &journal {
            let (j, key) = (j.clone(), key.clone());
            let (queue, corr) = (self.queue.clone(), self.body.correlation_id.clone());
            run_blocking(move || j.record_sent(&key, &queue, corr.as_deref())).await?;
        }
        // A transport failure leaves the journal entry: the outcome is unknown.
        let resp = self.client.transport().execute(req, Replay::Safe).await?;
        let status = resp.status();
        if !status.is_success() {
            let err = http::api_error(resp).await;
            if status.is_client_error() {
                // Refused for sure: nothing was created under this key.
                self.forget_key(&key).await;
            }
            return Err(err);
        }
        let replayed = resp
            .headers()
            .get("Idempotent-Replayed")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let request: Request = http::decode(resp).await?;
        let terminal = request.status.is_terminal();
        if let Some(j) = journal {
            if terminal {
                self.forget_key(&key).await;
            } else {
                let (k, id) = (key.clone(), request.id.clone());
                let (queue, corr) = (request.queue.clone(), request.correlation_id.clone());
                run_blocking(move || j.record_accepted(&k, &id, &queue, corr.as_deref()))
                    .await
                    .map_err(|e| {
                        Error::Journal(format!(
                            "request {} was accepted but could not be journaled: {e}",
                            request.id
                        ))
                    })?;
            }
        }
        Ok(Submitted {
            request,
            replayed,
            terminal,
            idempotency_key: key,
        })
    }

    async fn forget_key(&self, key: &str) {
        if let Some(j) = self.client.journal().cloned() {
            let key = key.to_string();
            let _ = run_blocking(move || j.forget(&key)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        Client::builder("http://127.0.0.1:9/base")
            .api_key("k1")
            .build()
            .unwrap()
    }

    fn header<'a>(req: &'a reqwest::Request, name: &str) -> Option<&'a str> {
        req.headers().get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn idempotency_key_is_stable_across_builds() {
        let b = client().submit("thumbs", &serde_json::json!({"url": "x"}));
        let key = b.key().to_string();
        assert!(uuid::Uuid::parse_str(&key).is_ok_and(|u| u.get_version_num() == 7));
        let first = b.build().unwrap();
        let second = b.build().unwrap();
        assert_eq!(header(&first, "idempotency-key"), Some(key.as_str()));
        assert_eq!(header(&second, "idempotency-key"), Some(key.as_str()));
        // Each retry is a clone of the one built request.
        let retry = first.try_clone().unwrap();
        assert_eq!(header(&retry, "idempotency-key"), Some(key.as_str()));
        assert_eq!(
            retry.body().unwrap().as_bytes(),
            first.body().unwrap().as_bytes()
        );
        // Two submits get two keys, the later one sorting after: the
        // server's key index grows at one end.
        let other = client().submit("thumbs", &1);
        assert_ne!(other.key(), key);
        assert!(other.key() > key.as_str());
    }

    #[test]
    fn builds_every_option() {
        let req = client()
            .submit("thumbs", &serde_json::json!({"a": 1}))
            .correlation_id("order-42")
            .priority(5)
            .delay(Duration::from_millis(1500))
            .timeout(Duration::from_secs(60))
            .max_attempts(4)
            .reply_to(ReplyTo::Channel("c1".into()))
            .metadata("tenant", "acme")
            .metadata("k", "v")
            .fallback_queue("thumbs-cpu")
            .fairness_key("acme")
            .idempotency_key("my-key")
            .prefer_wait(Duration::from_millis(2500))
            .build()
            .unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.url().as_str(),
            "http://127.0.0.1:9/base/v1/queues/thumbs/requests"
        );
        assert_eq!(header(&req, "idempotency-key"), Some("my-key"));
        assert_eq!(header(&req, "prefer"), Some("wait=3"));
        assert_eq!(header(&req, "authorization"), Some("Bearer k1"));
        assert_eq!(header(&req, "content-type"), Some("application/json"));
        // The HTTP timeout covers the server holding the answer.
        assert_eq!(req.timeout(), Some(&Duration::from_secs(33)));
        let body: serde_json::Value =
            serde_json::from_slice(req.body().unwrap().as_bytes().unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "input": {"a": 1},
                "correlation_id": "order-42",
                "priority": 5,
                "delay": 1.5,
                "timeout": 60.0,
                "max_attempts": 4,
                "reply_to": {"channel": "c1"},
                "metadata": {"k": "v", "tenant": "acme"},
                "fallback_queue": "thumbs-cpu",
                "fairness_key": "acme"
            })
        );
    }

    #[test]
    fn minimal_body_and_refusals() {
        let req = client().submit("q", &"hi").build().unwrap();
        assert!(req.headers().get("prefer").is_none());
        let body: serde_json::Value =
            serde_json::from_slice(req.body().unwrap().as_bytes().unwrap()).unwrap();
        assert_eq!(body, serde_json::json!({"input": "hi"}));

        assert!(matches!(
            client().submit("bad/queue", &1).build(),
            Err(Error::Invalid(_))
        ));

        struct NoSer;
        impl Serialize for NoSer {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("nope"))
            }
        }
        let err = client().submit("q", &NoSer).build().unwrap_err();
        assert!(matches!(err, Error::Invalid(m) if m.contains("nope")));
    }
}
