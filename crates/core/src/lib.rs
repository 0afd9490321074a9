//! # coatcheck-core
//!
//! The model of coatcheck and nothing else: the [`Request`] and its [`Status`]
//! state machine, every transition as a pure function over plain data
//! ([`rules`]), the retry/backoff policy ([`retry`]), the [`Clock`] seam, and
//! the wire types of the HTTP API ([`wire`]) shared by the server and the SDK.
//!
//! Deliberately **no I/O and no async runtime**: stores load a request, call a
//! rule, and persist what it returns, so exactly one place decides what a
//! transition does. Randomness (ids, lease tokens, jitter) is the only impurity
//! and it is confined to small helpers that callers may replace in tests.

pub mod clock;
pub mod history;
pub mod model;
pub mod retry;
pub mod rules;
pub mod validate;
pub mod wire;

pub use clock::{Clock, ManualClock, SystemClock, Ts};
pub use history::{EventKind, HistoryEvent};
pub use model::{ErrorInfo, Lease, ReplyTo, Request, Status, WebhookTarget};
pub use retry::RetryPolicy;
pub use rules::RuleError;
