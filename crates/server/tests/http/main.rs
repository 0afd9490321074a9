//! HTTP contract tests: a real server on 127.0.0.1:0 over a real embedded
//! store in a temp dir, driven over real HTTP. One module per area of
//! API.md; `helpers` holds the shared worker calls and wait loops.

mod claims;
mod failures;
mod fallback;
mod fuzz;
mod helpers;
mod list;
mod ops;
mod replies_channels;
mod replies_sse;
mod replies_webhooks;
mod security;
mod smoke;
mod status;
mod submit;
mod timing;
