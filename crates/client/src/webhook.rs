//! Verifying webhook replies on the receiving end, per
//! [Standard Webhooks](https://www.standardwebhooks.com/): a coatcheck
//! server signs every reply it POSTs with `webhook-id` (the reply's
//! `message_id`), `webhook-timestamp` (unix seconds) and `webhook-signature`
//! (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, one entry per
//! secret the server holds, space-separated).
//!
//! ```
//! use std::time::Duration;
//! use coatcheck_client::webhook::{self, VerifyError};
//! use reqwest::header::HeaderMap;
//!
//! let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
//! let body = br#"{"message_id":"msg_1","status":"succeeded"}"#;
//! let now = std::time::SystemTime::now()
//!     .duration_since(std::time::UNIX_EPOCH)
//!     .unwrap()
//!     .as_secs() as i64;
//!
//! // What a coatcheck server sends (here signed locally for the example).
//! let mut headers = HeaderMap::new();
//! headers.insert("webhook-id", "msg_1".parse().unwrap());
//! headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
//! let signature = webhook::sign(secret, "msg_1", now, body).unwrap();
//! headers.insert("webhook-signature", signature.parse().unwrap());
//!
//! // The receiver: the raw body bytes, exactly as received.
//! webhook::verify(&[secret], &headers, body, webhook::DEFAULT_TOLERANCE).unwrap();
//!
//! // A changed body, or a secret the sender does not hold, is refused.
//! assert!(matches!(
//!     webhook::verify(&[secret], &headers, b"{}", webhook::DEFAULT_TOLERANCE),
//!     Err(VerifyError::NoMatchingSignature)
//! ));
//! // So is a replay of an old delivery.
//! let old = (now - 3600).to_string();
//! let sig = webhook::sign(secret, "msg_1", now - 3600, body).unwrap();
//! assert!(matches!(
//!     webhook::verify(&[secret], ("msg_1", old.as_str(), sig.as_str()), body, Duration::from_secs(300)),
//!     Err(VerifyError::TooOld { .. })
//! ));
//! ```
//!
//! Key decisions:
//! - **Several secrets** (`&[&str]`): during a rotation the receiver accepts
//!   the old and the new one; the message passes if any `v1,` signature
//!   matches any secret. Entries of other versions (`v1a,` …) are ignored.
//! - **Constant time**: each candidate is checked with the HMAC's own
//!   constant-time comparison, never `==` on strings.
//! - **Replays**: a timestamp more than `tolerance` (the spec's
//!   [`DEFAULT_TOLERANCE`], 5 minutes) before or after the receiver's clock
//!   is refused, before the signature is even looked at. To refuse replays
//!   within the window too, remember the `webhook-id`s you processed (it is
//!   the reply's stable `message_id`, the same on every retry).
//! - Headers come from anything implementing [`WebhookHeaders`]: an
//!   `http::HeaderMap` (what axum, hyper and reqwest use) or a tuple
//!   `(id, timestamp, signature)`. The `svix-*` names are accepted too.
//! - Secrets are `whsec_` + base64 (the prefix is optional), as
//!   `coatcheck serve --webhook-secret` takes them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The spec's tolerance between the sender's timestamp and the receiver's clock.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Why a webhook was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A required header is missing (or not visible ASCII).
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not unix seconds.
    #[error("webhook-timestamp is not a unix time in seconds")]
    InvalidTimestamp,
    /// The timestamp is further in the past than the tolerance allows.
    #[error("the webhook timestamp {timestamp} is too old (now {now})")]
    TooOld {
        /// The message's timestamp.
        timestamp: i64,
        /// The receiver's clock.
        now: i64,
    },
    /// The timestamp is further in the future than the tolerance allows.
    #[error("the webhook timestamp {timestamp} is in the future (now {now})")]
    TooNew {
        /// The message's timestamp.
        timestamp: i64,
        /// The receiver's clock.
        now: i64,
    },
    /// No `v1,` signature matches any of the secrets.
    #[error("no signature matches")]
    NoMatchingSignature,
    /// The secret at this index of the list is not `whsec_` + base64.
    #[error("secret #{0} is not whsec_ followed by base64")]
    InvalidSecret(usize),
    /// No secret was given.
    #[error("no secret to verify with")]
    NoSecrets,
}

/// Where [`verify`] reads `webhook-id`, `webhook-timestamp` and
/// `webhook-signature` from.
pub trait WebhookHeaders {
    /// The value of header `name` (lower case), if present.
    fn header(&self, name: &str) -> Option<&str>;
}

impl WebhookHeaders for reqwest::header::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `(webhook-id, webhook-timestamp, webhook-signature)`.
impl WebhookHeaders for (&str, &str, &str) {
    fn header(&self, name: &str) -> Option<&str> {
        match name {
            "webhook-id" => Some(self.0),
            "webhook-timestamp" => Some(self.1),
            "webhook-signature" => Some(self.2),
            _ => None,
        }
    }
}

impl<T: WebhookHeaders + ?Sized> WebhookHeaders for &T {
    fn header(&self, name: &str) -> Option<&str> {
        (**self).header(name)
    }
}

fn required<'h>(
    headers: &'h impl WebhookHeaders,
    name: &'static str,
) -> Result<&'h str, VerifyError> {
    let alt = name.replacen("webhook-", "svix-", 1);
    headers
        .header(name)
        .or_else(|| headers.header(&alt))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(VerifyError::MissingHeader(name))
}

/// Verifies a webhook against the receiver's clock: the timestamp within
/// `tolerance` of now, and a `v1` signature by one of `secrets` over
/// `body`, the raw request body exactly as received (module docs).
pub fn verify(
    secrets: &[&str],
    headers: impl WebhookHeaders,
    body: &[u8],
    tolerance: Duration,
) -> Result<(), VerifyError> {
    verify_at(secrets, headers, body, tolerance, SystemTime::now())
}

/// [`verify`] with the receiver's clock at `now` (for tests and replays of
/// recorded messages).
pub fn verify_at(
    secrets: &[&str],
    headers: impl WebhookHeaders,
    body: &[u8],
    tolerance: Duration,
    now: SystemTime,
) -> Result<(), VerifyError> {
    if secrets.is_empty() {
        return Err(VerifyError::NoSecrets);
    }
    let keys = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| decode_secret(s).ok_or(VerifyError::InvalidSecret(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let id = required(&headers, "webhook-id")?;
    let ts_text = required(&headers, "webhook-timestamp")?;
    let signatures = required(&headers, "webhook-signature")?;

    if ts_text.is_empty() || !ts_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::InvalidTimestamp);
    }
    let timestamp: i64 = ts_text.parse().map_err(|_| VerifyError::InvalidTimestamp)?;
    let now = unix_seconds(now);
    let tol = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.saturating_sub(timestamp) > tol {
        return Err(VerifyError::TooOld { timestamp, now });
    }
    if timestamp.saturating_sub(now) > tol {
        return Err(VerifyError::TooNew { timestamp, now });
    }

    let candidates: Vec<Vec<u8>> = signatures
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .collect();
    for key in &keys {
        let mac = mac(key, id, ts_text, body);
        for sig in &candidates {
            // `verify_slice` compares in constant time.
            if mac.clone().verify_slice(sig).is_ok() {
                return Ok(());
            }
        }
    }
    Err(VerifyError::NoMatchingSignature)
}

/// The `webhook-signature` value (`v1,<base64>`) that `secret` gives
/// message `id` sent at `timestamp` with `body` — what a sender computes.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, VerifyError> {
    let key = decode_secret(secret).ok_or(VerifyError::InvalidSecret(0))?;
    let tag = mac(&key, id, &timestamp.to_string(), body)
        .finalize()
        .into_bytes();
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    ))
}

fn mac(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn decode_secret(secret: &str) -> Option<Vec<u8>> {
    let s = secret.trim();
    let b64 = s.strip_prefix("whsec_").unwrap_or(s);
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .filter(|k| !k.is_empty())
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector of the Standard Webhooks specification.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: &str = "1614265330";
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn the_spec_test_vector() {
        assert_eq!(sign(SECRET, ID, 1614265330, BODY).unwrap(), SIG);
        let now = at(1614265330);
        verify_at(&[SECRET], (ID, TS, SIG), BODY, DEFAULT_TOLERANCE, now).unwrap();
        // The prefix is optional.
        verify_at(
            &["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
            (ID, TS, SIG),
            BODY,
            DEFAULT_TOLERANCE,
            now,
        )
        .unwrap();
    }

    #[test]
    fn rotation_and_several_signatures() {
        let now = at(1614265330);
        let other = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let many = format!("v1a,xyz v1,bm90IGl0 {SIG} v1,%%%");
        verify_at(
            &[other, SECRET],
            (ID, TS, many.as_str()),
            BODY,
            DEFAULT_TOLERANCE,
            now,
        )
        .unwrap();
        assert_eq!(
            verify_at(&[other], (ID, TS, SIG), BODY, DEFAULT_TOLERANCE, now),
            Err(VerifyError::NoMatchingSignature)
        );
        // Only v1 entries count.
        let v1a = SIG.replacen("v1,", "v1a,", 1);
        assert_eq!(
            verify_at(
                &[SECRET],
                (ID, TS, v1a.as_str()),
                BODY,
                DEFAULT_TOLERANCE,
                now
            ),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn tampering_is_refused() {
        for (id, ts, body) in [
            ("msg_other", TS, BODY),
            (ID, "1614265331", BODY),
            (ID, TS, &br#"{"test": 2432232315}"#[..]),
        ] {
            let r = verify_at(
                &[SECRET],
                (id, ts, SIG),
                body,
                DEFAULT_TOLERANCE,
                at(1614265331),
            );
            assert_eq!(r, Err(VerifyError::NoMatchingSignature), "{id} {ts}");
        }
    }

    #[test]
    fn timestamps_outside_the_tolerance_are_refused() {
        let tol = DEFAULT_TOLERANCE;
        verify_at(&[SECRET], (ID, TS, SIG), BODY, tol, at(1614265330 + 300)).unwrap();
        verify_at(&[SECRET], (ID, TS, SIG), BODY, tol, at(1614265330 - 300)).unwrap();
        assert!(matches!(
            verify_at(&[SECRET], (ID, TS, SIG), BODY, tol, at(1614265330 + 301)),
            Err(VerifyError::TooOld { .. })
        ));
        assert!(matches!(
            verify_at(&[SECRET], (ID, TS, SIG), BODY, tol, at(1614265330 - 301)),
            Err(VerifyError::TooNew { .. })
        ));
        // With the wall clock, a 2021 message is long too old.
        assert!(matches!(
            verify(&[SECRET], (ID, TS, SIG), BODY, tol),
            Err(VerifyError::TooOld { .. })
        ));
        for bad in ["", "-5", "1614265330.5", "abc", "99999999999999999999999"] {
            assert_eq!(
                verify_at(&[SECRET], (ID, bad, SIG), BODY, tol, at(1614265330)),
                if bad.is_empty() {
                    Err(VerifyError::MissingHeader("webhook-timestamp"))
                } else {
                    Err(VerifyError::InvalidTimestamp)
                },
                "{bad:?}"
            );
        }
    }

    #[test]
    fn headers_and_secrets() {
        let now = at(1614265330);
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(
            verify_at(&[SECRET], &h, BODY, DEFAULT_TOLERANCE, now),
            Err(VerifyError::MissingHeader("webhook-id"))
        );
        h.insert("Webhook-Id", ID.parse().unwrap());
        h.insert("webhook-timestamp", TS.parse().unwrap());
        assert_eq!(
            verify_at(&[SECRET], &h, BODY, DEFAULT_TOLERANCE, now),
            Err(VerifyError::MissingHeader("webhook-signature"))
        );
        h.insert("svix-signature", SIG.parse().unwrap());
        verify_at(&[SECRET], &h, BODY, DEFAULT_TOLERANCE, now).unwrap();
        assert_eq!(
            verify_at(&[], &h, BODY, DEFAULT_TOLERANCE, now),
            Err(VerifyError::NoSecrets)
        );
        assert_eq!(
            verify_at(
                &[SECRET, "whsec_not base64!"],
                &h,
                BODY,
                DEFAULT_TOLERANCE,
                now
            ),
            Err(VerifyError::InvalidSecret(1))
        );
        assert!(sign("whsec_", ID, 1, BODY).is_err());
    }
}
