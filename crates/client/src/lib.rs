//! # coatcheck-client
//!
//! The Rust SDK of [coatcheck](https://example.invalid/coatcheck), a server for
//! the Asynchronous Request-Reply pattern: hand a long-running request in, get
//! a ticket (an id) at once, come back for the reply later — nothing lost
//! meanwhile. This crate is the client side ([`Client`]) and the worker side
//! ([`Worker`]); it never depends on the server.
//!
//! ## Submit and wait
//!
//! ```no_run
//! use std::time::Duration;
//! use coatcheck_client::Client;
//!
//! # async fn demo() -> Result<(), coatcheck_client::Error> {
//! let client = Client::builder("http://127.0.0.1:8080").api_key("key").build()?;
//! let ticket = client
//!     .submit("thumbnails", &serde_json::json!({"url": "https://…/cat.png", "width": 128}))
//!     .correlation_id("order-42")
//!     .send()
//!     .await?;
//! // Long-polls until the request is terminal, then reads its output.
//! let thumb: String = client.wait_result(ticket.id(), Some(Duration::from_secs(300))).await?;
//! # Ok(()) }
//! ```
//!
//! Every submit carries a generated `Idempotency-Key` that is reused on
//! transport retries, so a retried submit never creates a second request.
//! Opt into a durable [journal] of submitted requests
//! ([`ClientBuilder::journal`]) and a restarted process finds what it was
//! waiting for in [`Client::pending`].
//!
//! ## Write a worker in 5 lines
//!
//! ```no_run
//! use coatcheck_client::{Client, HandlerError, Job, Worker};
//!
//! #[derive(serde::Deserialize)]
//! struct Thumb { url: String, width: u32 }
//!
//! # async fn demo() -> Result<(), coatcheck_client::Error> {
//! Worker::new(Client::new("http://127.0.0.1:8080")?, "thumbnails")
//!     .concurrency(8)
//!     .run(|job: Job<Thumb>| async move {
//!         Ok::<_, HandlerError>(format!("{}?w={}", job.input.url, job.input.width))
//!     }, tokio::signal::ctrl_c())
//!     .await
//! # }
//! ```
//!
//! The runtime claims in batches up to free capacity with long-polls, renews
//! leases by heartbeat, reports progress ([`Job::progress`]), passes a
//! cancellation token ([`Job::cancelled`]), survives the server being briefly
//! unreachable, turns panics into failed attempts and shuts down gracefully.
//! Return [`HandlerError::fatal`] for failures no retry can fix and
//! [`HandlerError::retryable`] (or any `std::error::Error` via `?`) for the rest.
//!
//! ## Every way a reply comes back
//!
//! - **Wait** (long-poll): [`Client::wait`], [`Client::wait_result`].
//! - **Follow** it as it changes (Server-Sent Events, resumed by itself
//!   after a dropped connection): [`Client::events`].
//!
//!   ```no_run
//!   # use futures::StreamExt;
//!   # async fn demo(client: coatcheck_client::Client, id: &str) -> coatcheck_client::Result<()> {
//!   let mut events = client.events(id);
//!   while let Some(event) = events.next().await {
//!       let event = event?; // status or progress, with the whole request
//!       println!("{:?} {} {:?}", event.kind, event.request.status, event.request.progress);
//!   }
//!   # Ok(()) }
//!   ```
//! - **A reply channel**, the durable return address: submit with
//!   `reply_to(ReplyTo::Channel(..))`, consume with [`Client::channel`] and
//!   ack each [`Delivery`] (at-least-once); [`Channel::messages`] long-polls,
//!   [`Channel::events`] has the server push them over SSE.
//!
//!   ```no_run
//!   # use futures::StreamExt;
//!   # async fn demo(client: coatcheck_client::Client) -> coatcheck_client::Result<()> {
//!   let mut replies = client.channel("my-replies").messages();
//!   while let Some(reply) = replies.next().await {
//!       let reply = reply?;
//!       println!("{} {:?}", reply.message.request_id, reply.message.output);
//!       reply.ack().await?;
//!   }
//!   # Ok(()) }
//!   ```
//! - **A signed webhook** the server POSTs to you: check it with
//!   [`webhook::verify`] (Standard Webhooks).
//!
//! ## Errors
//!
//! Every call returns [`Error`]; a non-2xx answer is [`Error::Api`] with the
//! server's RFC 9457 problem document.
//!
//! ## Module map
//!
//! - `client`: [`Client`], [`ClientBuilder`], the request calls and the raw
//!   worker calls; `submit`: [`SubmitBuilder`], [`Submitted`]; `list`:
//!   [`ListQuery`] and the paginating stream.
//! - [`events`]: [`Client::events`] and [`RequestEvent`]; `channel`:
//!   [`Client::channel`], [`Channel`], [`Delivery`] and the raw
//!   [`Client::channel_receive`] / [`Client::channel_ack`]; [`webhook`]:
//!   verifying signed webhook replies.
//! - [`journal`]: the client-side pending journal.
//! - `worker`: [`Worker`], [`Job`], [`HandlerError`], [`WorkerEvent`].
//! - `error`: [`Error`]; `http` and `backoff`: transport details.
//!
//! The wire types come from `coatcheck-core` and are re-exported here
//! ([`wire`], [`Request`], [`Status`], …) so that users need only this crate.

#![warn(missing_docs)]

mod backoff;
mod channel;
mod client;
mod error;
pub mod events;
mod http;
pub mod journal;
mod list;
mod sse;
mod submit;
pub mod webhook;
mod worker;

pub use channel::{Channel, Deliveries, Delivery};
pub use client::{CancelOutcome, Client, ClientBuilder};
pub use error::{Error, Result};
pub use events::{RequestEvent, RequestEventKind, RequestEvents};
pub use journal::PendingEntry;
pub use list::ListQuery;
pub use submit::{SubmitBuilder, Submitted};
pub use worker::{HandlerError, Job, ProgressHandle, Worker, WorkerEvent};

pub use coatcheck_core::wire;
pub use coatcheck_core::wire::Problem;
pub use coatcheck_core::{
    ErrorInfo, EventKind, HistoryEvent, ReplyTo, Request, Status, Ts, WebhookTarget,
};
pub use tokio_util::sync::CancellationToken;
