//! The one error type of the SDK.
//!
//! Key decisions:
//! - Every non-2xx answer becomes [`Error::Api`] carrying the server's RFC 9457
//!   problem document as is, so callers can read its extension members
//!   (`request_status`, `error`, `field`, …). A body that is not a problem
//!   document (a proxy's HTML page, an empty 502) is turned into a synthetic one
//!   with `type: "about:blank"`, so callers never need a second code path.
//! - The enum is `#[non_exhaustive]`; match on the helpers ([`Error::status`],
//!   [`Error::is_conflict`], [`Error::is_transient`], …) rather than on variants
//!   where you can.

use coatcheck_core::wire::Problem;
use coatcheck_core::{ErrorInfo, Status};

/// Everything that can go wrong talking to a coatcheck server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with a non-2xx status and this problem document.
    #[error("{status} {}: {}", problem.title, problem.detail)]
    Api {
        /// The HTTP status of the answer.
        status: u16,
        /// The server's problem document (or a synthetic one, see the module docs).
        problem: Problem,
    },
    /// The HTTP exchange itself failed (connect, reset, per-call timeout, …)
    /// after the configured transport retries.
    #[error("transport: {0}")]
    Transport(#[from] reqwest::Error),
    /// An overall timeout the caller set (e.g. on [`crate::Client::wait`]) ran out.
    #[error("timed out")]
    Timeout,
    /// `GET …/result` answered 202: the request is not terminal yet.
    #[error("the request is not finished yet")]
    NotReady,
    /// A 2xx answer whose body is not what the API promises, or an output that
    /// does not deserialize into the type the caller asked for.
    #[error("cannot decode: {0}")]
    Decode(String),
    /// A stream ([`crate::Client::events`], [`crate::Channel::messages`]) was
    /// cut off and could not be resumed.
    #[error("stream interrupted: {0}")]
    Interrupted(String),
    /// The client-side pending journal could not be read or written.
    #[error("journal: {0}")]
    Journal(String),
    /// The SDK refused an argument before sending anything (a base URL that is
    /// not http(s), an input that does not serialize, a bad queue name, …).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// `Result<T, coatcheck_client::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The HTTP status, for [`Error::Api`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's problem document, for [`Error::Api`].
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Error::Api { problem, .. } => Some(problem),
            _ => None,
        }
    }

    /// A `409 Conflict`: a stale lease token, a terminal request, a result
    /// that is failed/cancelled/expired, …
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }

    /// A `404 Not Found`: unknown id (or another tenant's).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Whether trying again later may succeed: transport failures, `408`,
    /// `429` and `5xx`. The worker runtime backs off and retries these.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport(e) => !e.is_builder() && !e.is_decode(),
            Error::Api { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Error::Interrupted(_) => true,
            _ => false,
        }
    }

    /// The request's status from a `409` of `GET …/result` (extension member
    /// `request_status`).
    pub fn request_status(&self) -> Option<Status> {
        let value = self.problem()?.extensions.get("request_status")?;
        Status::parse(value.as_str()?)
    }

    /// The request's error from a `409` of `GET …/result` (extension member `error`).
    pub fn request_error(&self) -> Option<ErrorInfo> {
        let value = self.problem()?.extensions.get("error")?;
        serde_json::from_value(value.clone()).ok()
    }

    /// Builds the error for a non-2xx answer from its status and body.
    pub(crate) fn from_body(status: u16, body: &[u8]) -> Error {
        if let Ok(problem) = serde_json::from_slice::<Problem>(body) {
            return Error::Api { status, problem };
        }
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let detail = if text.is_empty() {
            format!("the server answered {status} without a problem document")
        } else {
            truncate(text, 512)
        };
        Error::Api {
            status,
            problem: synthetic_problem(status, detail),
        }
    }
}

/// A problem document made up on the client's side.
pub(crate) fn synthetic_problem(status: u16, detail: String) -> Problem {
    let title = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unexpected status")
        .to_string();
    Problem {
        type_: "about:blank".to_string(),
        title,
        status,
        detail,
        extensions: serde_json::Map::new(),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_problem_document() {
        let body =
            br#"{"type":"https://coatcheck.dev/problems/request-failed","title":"Request failed",
            "status":409,"detail":"the request failed","request_status":"failed",
            "error":{"code":"boom","message":"it broke"}}"#;
        let err = Error::from_body(409, body);
        assert!(err.is_conflict());
        assert!(!err.is_not_found());
        assert!(!err.is_transient());
        assert_eq!(err.status(), Some(409));
        let problem = err.problem().unwrap();
        assert_eq!(problem.title, "Request failed");
        assert_eq!(err.request_status(), Some(Status::Failed));
        let info = err.request_error().unwrap();
        assert_eq!(info.code.as_deref(), Some("boom"));
        assert_eq!(info.message, "it broke");
        assert_eq!(err.to_string(), "409 Request failed: the request failed");
    }

    #[test]
    fn synthesizes_a_problem_for_other_bodies() {
        let err = Error::from_body(502, b"<html>Bad gateway</html>");
        let p = err.problem().unwrap();
        assert_eq!(p.type_, "about:blank");
        assert_eq!(p.title, "Bad Gateway");
        assert_eq!(p.status, 502);
        assert_eq!(p.detail, "<html>Bad gateway</html>");
        assert!(err.is_transient());
        assert_eq!(err.request_status(), None);

        let err = Error::from_body(404, b"");
        assert!(err.is_not_found());
        assert!(err
            .problem()
            .unwrap()
            .detail
            .contains("without a problem document"));

        let long = "é".repeat(1000);
        let err = Error::from_body(400, long.as_bytes());
        assert!(err.problem().unwrap().detail.len() <= 512 + "…".len());
    }

    #[test]
    fn transient_statuses() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(Error::from_body(s, b"").is_transient(), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 413, 422] {
            assert!(!Error::from_body(s, b"").is_transient(), "{s}");
        }
        assert!(!Error::Timeout.is_transient());
    }
}
