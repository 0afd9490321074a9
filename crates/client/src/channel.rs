//! Consuming a reply channel, the durable return address: the raw calls
//! ([`Client::channel_receive`], [`Client::channel_ack`]) and a consumer,
//! [`Client::channel`], whose [`Channel::messages`] is a stream of
//! [`Delivery`]s, each acknowledged with [`Delivery::ack`].
//!
//! ```
//! use futures::StreamExt;
//! use coatcheck_client::{Client, ReplyTo};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> coatcheck_client::Result<()> {
//! # let server = coatcheck_testkit::TestServer::start().await;
//! # let url = server.base_url();
//! let client = Client::new(url)?;
//! client
//!     .submit("thumbnails", &serde_json::json!({"url": "https://…/cat.png"}))
//!     .correlation_id("order-42")
//!     .reply_to(ReplyTo::Channel("my-replies".into()))
//!     .send()
//!     .await?;
//! # {
//! #     use coatcheck_client::wire::ClaimBody;
//! #     let body = ClaimBody { worker_id: "w".into(), max: Some(1), lease: None, wait: Some(5.0) };
//! #     let job = client.claim("thumbnails", body).await?.remove(0);
//! #     client.complete(&job.id, &job.lease_token, &"cat-128.png").await?;
//! # }
//!
//! let mut replies = client.channel("my-replies").messages();
//! while let Some(reply) = replies.next().await {
//!     let reply = reply?;
//!     assert_eq!(reply.message.correlation_id.as_deref(), Some("order-42"));
//!     let thumb: String = reply.output()?;
//!     println!("{thumb}");
//!     reply.ack().await?; // not acked within the visibility timeout: delivered again
//!     # break;
//! }
//! # Ok(()) }
//! ```
//!
//! Key decisions:
//! - **At-least-once**: a received message is hidden for the visibility
//!   timeout (default 30 s) and delivered again (same `message_id`, higher
//!   `delivery_count`) unless acked by then. Ack after the reply is safely
//!   handled; deduplicate by `message_id` if handling twice would hurt.
//! - The stream long-polls in batches of up to `max` (default 10) and hands
//!   them out one at a time; the visibility timeout runs from the receive,
//!   so a slow consumer should lower `max` or raise `visibility`.
//! - Transient failures (transport, `429`, `5xx`) are retried with backoff
//!   (200 ms … 10 s); after [`crate::events::MAX_RECONNECTS`] failures in a
//!   row the stream yields the error and ends. Other errors end it at once.
//! - Acking the reply of a request in this client's [journal](crate::journal)
//!   counts as consuming it: the request leaves the journal.
//! - [`Channel::events`] is the same stream pushed over Server-Sent Events
//!   (`GET /v1/channels/{name}/events`) instead of long-polled: the server
//!   hands each message over as it arrives; acks, visibility and redelivery
//!   work the same. A dropped connection is reopened (an idle one is taken
//!   as dropped after [`crate::events::IDLE_TIMEOUT`]; the server sends
//!   keep-alives); the error rules are those of the request event stream.
//!   [`Channel::events_auto_acked`] lets the server remove each message as
//!   it writes it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use coatcheck_core::validate;
use coatcheck_core::wire::{AckBody, AckResponse, ChannelMessage, ChannelMessages, ReplyMessage};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::backoff::{secs, Backoff};
use crate::client::{Client, MAX_POLL};
use crate::error::{Error, Result};
use crate::events::{Session, IDLE_TIMEOUT, MAX_RECONNECTS};
use crate::http::{self, Replay};

/// Most messages one receive may ask for (the API's limit).
pub const MAX_RECEIVE: u32 = 100;
/// Most tokens one ack may carry (the API's limit).
pub const MAX_ACK: usize = 1000;

impl Client {
    /// `GET /v1/channels/{name}/messages`: up to `max` (1..=100) reply
    /// messages, long-polling up to `wait` for the first; each is hidden
    /// for `visibility` and delivered again unless acked by then. Possibly
    /// empty after `wait`.
    pub async fn channel_receive(
        &self,
        name: &str,
        max: u32,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<ChannelMessage>> {
        check_channel(name)?;
        if !(1..=MAX_RECEIVE).contains(&max) {
            return Err(Error::Invalid(format!(
                "a receive takes 1..={MAX_RECEIVE} messages, not {max}"
            )));
        }
        if visibility < Duration::from_millis(1) {
            return Err(Error::Invalid(
                "the visibility must be at least 1 ms".into(),
            ));
        }
        let t = self.transport();
        let rb = t
            .request(
                Method::GET,
                t.url(&["v1", "channels", name, "messages"])?,
                wait,
            )
            .query(&[
                ("max", max.to_string()),
                ("wait", secs(wait).to_string()),
                ("visibility", secs(visibility).to_string()),
            ]);
        // Repeating a receive whose answer was lost only delays those
        // messages by one visibility timeout: safe.
        let got: ChannelMessages = http::json(t.send(rb, Replay::Safe).await?).await?;
        Ok(got.messages)
    }

    /// `POST /v1/channels/{name}/ack`: removes the messages received under
    /// `tokens` (1..=1000) for good. A token whose message was already acked
    /// or delivered again (its visibility ran out) comes back in `not_found`.
    pub async fn channel_ack(&self, name: &str, tokens: Vec<String>) -> Result<AckResponse> {
        check_channel(name)?;
        if tokens.is_empty() || tokens.len() > MAX_ACK {
            return Err(Error::Invalid(format!(
                "an ack takes 1..={MAX_ACK} tokens, not {}",
                tokens.len()
            )));
        }
        let t = self.transport();
        let rb = t
            .request(
                Method::POST,
                t.url(&["v1", "channels", name, "ack"])?,
                Duration::ZERO,
            )
            .json(&AckBody { ack_tokens: tokens });
        // Acks are idempotent (a repeat finds the tokens `not_found`).
        http::json(t.send(rb, Replay::Safe).await?).await
    }

    /// A consumer of reply channel `name` (channels need no creation step).
    pub fn channel(&self, name: impl Into<String>) -> Channel {
        Channel {
            client: self.clone(),
            name: name.into(),
            max: 10,
            visibility: Duration::from_secs(30),
            wait: Duration::from_secs(30),
        }
    }
}

/// A consumer of one reply channel; see [`Client::channel`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Channel {
    client: Client,
    name: String,
    max: u32,
    visibility: Duration,
    wait: Duration,
}

impl Channel {
    /// The channel's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Messages per receive, 1..=100 (default 10).
    pub fn max(mut self, max: u32) -> Self {
        self.max = max.clamp(1, MAX_RECEIVE);
        self
    }

    /// How long a received message stays hidden before it is delivered
    /// again unless acked (default 30 s).
    pub fn visibility(mut self, visibility: Duration) -> Self {
        self.visibility = visibility;
        self
    }

    /// How long one receive long-polls (default 30 s; the server caps it).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait.min(MAX_POLL);
        self
    }

    /// One receive: up to `max` messages, possibly none after `wait`.
    pub async fn receive(&self) -> Result<Vec<Delivery>> {
        let got = self
            .client
            .channel_receive(&self.name, self.max, self.visibility, self.wait)
            .await?;
        Ok(got.into_iter().map(|m| self.delivery(m)).collect())
    }

    /// Acks many deliveries in one call (up to 1000).
    pub async fn ack_all<'a>(
        &self,
        deliveries: impl IntoIterator<Item = &'a Delivery>,
    ) -> Result<AckResponse> {
        let (tokens, ids): (Vec<String>, Vec<String>) = deliveries
            .into_iter()
            .map(|d| (d.ack_token.clone(), d.message.request_id.clone()))
            .unzip();
        let answer = self.client.channel_ack(&self.name, tokens).await?;
        for id in ids {
            self.client.forget_quietly(&id).await;
        }
        Ok(answer)
    }

    /// Every message of the channel as it arrives, for as long as the
    /// stream is polled (module docs for batching, visibility and errors).
    pub fn messages(&self) -> Deliveries {
        let state = Consumer {
            channel: self.clone(),
            buf: VecDeque::new(),
            failures: 0,
            done: false,
        };
        Deliveries {
            inner: futures::stream::unfold(state, |mut s| async move {
                let item = s.next().await?;
                Some((item, s))
            })
            .boxed(),
        }
    }

    /// Every message of the channel pushed over Server-Sent Events
    /// (`GET /v1/channels/{name}/events`), each acked by you with
    /// [`Delivery::ack`] as with [`Channel::messages`]; one not acked within
    /// the visibility is pushed again. The connection is reopened when it
    /// drops (module docs for errors); `max` and `wait` do not apply.
    pub fn events(&self) -> Deliveries {
        self.pushed(false)
    }

    /// As [`Channel::events`], but the server removes each message once it
    /// has written it to the stream (`?auto_ack=true`): nothing to ack, and
    /// a message written just before the connection dropped is lost to this
    /// consumer.
    pub fn events_auto_acked(&self) -> Deliveries {
        self.pushed(true)
    }

    fn pushed(&self, auto_ack: bool) -> Deliveries {
        let state = Pushed {
            channel: self.clone(),
            auto_ack,
            session: Session::new(self.client.clone(), format!("channel {}", self.name)),
            buf: VecDeque::new(),
        };
        Deliveries {
            inner: futures::stream::unfold(state, |mut s| async move {
                let item = s.next().await?;
                Some((item, s))
            })
            .boxed(),
        }
    }

    fn delivery(&self, m: ChannelMessage) -> Delivery {
        Delivery {
            message: m.message,
            ack_token: m.ack_token,
            delivery_count: m.delivery_count,
            client: self.client.clone(),
            channel: self.name.clone(),
        }
    }
}

/// One reply message received from a channel, with what it takes to ack it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Delivery {
    /// The reply: `message_id`, `request_id`, `correlation_id`, `queue`,
    /// `status`, `output`, `error`, `finished_at`.
    pub message: ReplyMessage,
    /// The token that acks this delivery (valid until its visibility runs out).
    pub ack_token: String,
    /// How many times this message has been delivered (1 the first time).
    pub delivery_count: u32,
    client: Client,
    channel: String,
}

impl Delivery {
    /// Removes the message for good. `Ok(true)`: acked now; `Ok(false)`:
    /// the token no longer holds it (already acked, or its visibility ran
    /// out and it was or will be delivered again).
    pub async fn ack(&self) -> Result<bool> {
        let answer = self
            .client
            .channel_ack(&self.channel, vec![self.ack_token.clone()])
            .await?;
        self.client.forget_quietly(&self.message.request_id).await;
        Ok(answer.acked.contains(&self.ack_token))
    }

    /// The output of a succeeded request as `T`; for any other status an
    /// [`Error::Decode`] naming it (`message.error` says why it did not
    /// succeed).
    pub fn output<T: DeserializeOwned>(&self) -> Result<T> {
        match &self.message.output {
            // A `null` output arrives as no output at all.
            raw if self.message.status == coatcheck_core::Status::Succeeded => {
                let json = raw.as_deref().map_or("null", RawValue::get);
                serde_json::from_str(json).map_err(|e| {
                    Error::Decode(format!("output of {}: {e}", self.message.request_id))
                })
            }
            _ => Err(Error::Decode(format!(
                "request {} ended {}, without an output",
                self.message.request_id, self.message.status
            ))),
        }
    }

    /// The channel it came from.
    pub fn channel(&self) -> &str {
        &self.channel
    }
}

/// The stream [`Channel::messages`] returns: `Unpin`, `Send`, `'static`.
#[must_use = "streams do nothing unless polled"]
pub struct Deliveries {
    inner: BoxStream<'static, Result<Delivery>>,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries").finish_non_exhaustive()
    }
}

impl Stream for Deliveries {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

struct Consumer {
    channel: Channel,
    buf: VecDeque<Delivery>,
    failures: u32,
    done: bool,
}

impl Consumer {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if let Some(d) = self.buf.pop_front() {
                return Some(Ok(d));
            }
            if self.done {
                return None;
            }
            match self.channel.receive().await {
                Ok(batch) => {
                    self.failures = 0;
                    self.buf.extend(batch);
                }
                Err(e) if e.is_transient() && self.failures < MAX_RECONNECTS => {
                    let pause = Backoff::WORKER.jittered(self.failures);
                    self.failures += 1;
                    tokio::time::sleep(pause).await;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// The state of [`Channel::events`].
struct Pushed {
    channel: Channel,
    auto_ack: bool,
    session: Session,
    buf: VecDeque<Delivery>,
}

impl Pushed {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if let Some(d) = self.buf.pop_front() {
                return Some(Ok(d));
            }
            let ch = &self.channel;
            let url = || {
                check_channel(&ch.name)?;
                let mut url = ch
                    .client
                    .transport()
                    .url(&["v1", "channels", &ch.name, "events"])?;
                url.query_pairs_mut()
                    .append_pair("visibility", &secs(ch.visibility).to_string())
                    .append_pair("auto_ack", if self.auto_ack { "true" } else { "false" });
                Ok(url)
            };
            // A reopened stream pushes again what was not acked, once its
            // visibility runs out.
            let events = match self.session.next(url, None, IDLE_TIMEOUT, true).await? {
                Ok(events) => events,
                Err(e) => return Some(Err(e)),
            };
            for e in events.into_iter().filter(|e| e.event == "message") {
                match serde_json::from_str::<ChannelMessage>(&e.data) {
                    Ok(m) => {
                        if self.auto_ack {
                            // Removed by the server as it was written:
                            // consumed, as an ack would have it.
                            let id = &m.message.request_id;
                            self.channel.client.forget_quietly(id).await;
                        }
                        self.buf.push_back(self.channel.delivery(m));
                    }
                    Err(err) => {
                        self.session.end();
                        return Some(Err(Error::Decode(format!(
                            "a message of channel {}: {err}",
                            self.channel.name
                        ))));
                    }
                }
            }
        }
    }
}

fn check_channel(name: &str) -> Result<()> {
    validate::name("channel", name).map_err(|e| Error::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn arguments_are_checked_before_sending() {
        let c = Client::new("http://127.0.0.1:9").unwrap();
        let d = Duration::from_secs(1);
        for (name, max, vis) in [
            ("bad/name", 1, d),
            ("ok", 0, d),
            ("ok", 101, d),
            ("ok", 1, Duration::ZERO),
        ] {
            assert!(
                matches!(
                    c.channel_receive(name, max, vis, d).await,
                    Err(Error::Invalid(_))
                ),
                "{name} {max} {vis:?}"
            );
        }
        assert!(matches!(
            c.channel_ack("ok", vec![]).await,
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            c.channel_ack("ok", vec!["t".into(); 1001]).await,
            Err(Error::Invalid(_))
        ));
        let ch = c
            .channel("replies")
            .max(1000)
            .wait(Duration::from_secs(600));
        assert_eq!(ch.max, 100);
        assert_eq!(ch.wait, MAX_POLL);
        assert_eq!(ch.name(), "replies");
        let mut pushed = c.channel("bad/name").events();
        assert!(matches!(pushed.next().await, Some(Err(Error::Invalid(_)))));
        assert!(pushed.next().await.is_none(), "and the stream ends");
    }
}
