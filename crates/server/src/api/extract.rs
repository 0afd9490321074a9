//! Our own extractors: a JSON body, a query string and a path segment whose
//! every rejection is a problem document (never axum's plain-text 400/415/422).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::problem::ApiError;
use crate::engine::Engine;

/// A JSON body, parsed; also keeps the raw bytes (for idempotency hashing).
pub struct JsonBody<T> {
    /// The parsed value.
    pub value: T,
    /// The bytes as received.
    pub raw: Bytes,
}

fn is_json(ct: &str) -> bool {
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Parses JSON bytes into `T`, mapping every failure to a 400 problem.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let kind = if e.is_data() {
            "a field has the wrong type or is missing"
        } else {
            "the body is not valid JSON"
        };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-json",
            "Invalid JSON body",
            format!("{kind}: {e}"),
        )
    })
}

// Bodies are read under `body_read_timeout` (a client that trickles its
// body gets `408`), and refusals by size or time are counted in /metrics;
// both need the engine, so this extractor is for the app's own state.
impl<T: DeserializeOwned> FromRequest<Arc<Engine>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, engine: &Arc<Engine>) -> Result<Self, ApiError> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_json(ct) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                "the body must be JSON with Content-Type: application/json",
            ));
        }
        let limit = engine.config.body_read_timeout;
        let read = tokio::time::timeout(limit, Bytes::from_request(req, engine)).await;
        let raw = match read {
            Err(_) => {
                engine.metrics.refused("body_timeout");
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request-timeout",
                    "Request timeout",
                    format!("the body did not arrive within {} s", limit.as_secs_f64()),
                )
                .header(header::CONNECTION, "close"));
            }
            Ok(Err(rej)) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                engine.metrics.refused("body_size");
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload-too-large",
                    "Payload too large",
                    "the body is larger than the server's limit (--max-body)",
                ));
            }
            Ok(Err(rej)) => {
                return Err(ApiError::bad_request(format!(
                    "the body could not be read: {rej}"
                )))
            }
            Ok(Ok(raw)) => raw,
        };
        let value = parse_json(&raw)?;
        Ok(JsonBody { value, raw })
    }
}

/// A query string, parsed; failures are 400 problems.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded_from_str(q).map(QueryParams)
    }
}

fn serde_urlencoded_from_str<T: DeserializeOwned>(q: &str) -> Result<T, ApiError> {
    axum::extract::Query::<T>::try_from_uri(
        &format!("http://x/?{q}")
            .parse()
            .map_err(|_| ApiError::bad_request("the query string is malformed"))?,
    )
    .map(|axum::extract::Query(v)| v)
    .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))
}

/// One path segment (e.g. a request id or queue name), percent-decoded.
pub struct Segment(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Segment {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(s)| Segment(s))
            .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::channels::ReceiveQuery;
    use crate::api::requests::{ListQuery, WaitQuery};
    use coatcheck_core::wire::{
        AckBody, ClaimBody, CompleteBody, FailBody, HeartbeatBody, SettlementsBody, SubmitBody,
    };
    use proptest::prelude::*;

    /// Every body type of a POST route, parsed from `bytes`: Ok, or a 400
    /// `invalid-json` problem — never a panic, never another status.
    fn parse_every_body(bytes: &[u8]) -> Result<(), TestCaseError> {
        fn one<T: DeserializeOwned>(bytes: &[u8]) -> Result<(), TestCaseError> {
            if let Err(e) = parse_json::<T>(bytes) {
                prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                prop_assert_eq!(e.problem().type_, "/problems/invalid-json");
            }
            Ok(())
        }
        one::<SubmitBody>(bytes)?;
        one::<ClaimBody>(bytes)?;
        one::<HeartbeatBody>(bytes)?;
        one::<CompleteBody>(bytes)?;
        one::<FailBody>(bytes)?;
        one::<SettlementsBody>(bytes)?;
        one::<AckBody>(bytes)?;
        Ok(())
    }

    /// Any JSON value, with the numbers that break parsers: huge, tiny,
    /// negative zero, past u32/i64.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::{json, Value};
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                .prop_map(Value::from),
            prop_oneof![
                Just(json!(1e308)),
                Just(json!(-0.0)),
                Just(json!(5e-324)),
                Just(json!(4294967296u64)),
                Just(json!(1.5)),
                Just(json!(-1)),
            ],
            "\\PC{0,24}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(field_name(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A field name: one the bodies know (so values reach the field
    /// parsers), or anything.
    fn field_name() -> impl Strategy<Value = String> {
        prop_oneof![
            prop_oneof![
                Just("input"),
                Just("correlation_id"),
                Just("priority"),
                Just("delay"),
                Just("timeout"),
                Just("max_attempts"),
                Just("reply_to"),
                Just("metadata"),
                Just("channel"),
                Just("webhook"),
                Just("url"),
                Just("worker_id"),
                Just("max"),
                Just("lease"),
                Just("wait"),
                Just("lease_token"),
                Just("progress"),
                Just("extend"),
                Just("output"),
                Just("error"),
                Just("message"),
                Just("code"),
                Just("retryable"),
                Just("retry_after"),
                Just("items"),
                Just("id"),
                Just("ack_tokens"),
            ]
            .prop_map(String::from),
            "\\PC{0,12}",
        ]
    }

    /// A query string of known and unknown keys with random values, raw or
    /// percent-encoded.
    fn query() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            prop_oneof![
                Just("wait"),
                Just("limit"),
                Just("max"),
                Just("visibility"),
                Just("auto_ack"),
                Just("queue"),
                Just("status"),
                Just("correlation_id"),
                Just("page_token"),
            ]
            .prop_map(String::from),
            "[a-z_]{0,8}",
        ];
        let value = prop_oneof![
            "[0-9.eE+-]{0,12}",
            "-?(inf|NaN|infinity|1e400|1e-400|0x10|4294967296|18446744073709551616)",
            "(true|false|1|0|yes)",
            proptest::collection::vec(any::<u8>(), 0..24)
                .prop_map(|b| { b.iter().map(|b| format!("%{b:02X}")).collect::<String>() }),
            "[ -~]{0,16}",
        ];
        proptest::collection::vec((key, value), 0..5).prop_map(|kv| {
            kv.into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        })
    }

    fn parse_every_query(q: &str) -> Result<(), TestCaseError> {
        fn one<T: DeserializeOwned>(q: &str) -> Result<(), TestCaseError> {
            if let Err(e) = serde_urlencoded_from_str::<T>(q) {
                prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            }
            Ok(())
        }
        one::<WaitQuery>(q)?;
        one::<ListQuery>(q)?;
        one::<ReceiveQuery>(q)?;
        Ok(())
    }

    #[test]
    fn bodies_of_the_wrong_shape_are_400_invalid_json() {
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"{\"input\":1,\"max_attempts\":-1}",
            b"{\"worker_id\":\"w\",\"max\":1.5}",
            b"\xff\xfe",
        ] {
            let e = parse_json::<SubmitBody>(bad)
                .err()
                .or_else(|| parse_json::<ClaimBody>(bad).err())
                .expect("refused");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn queries_parse_or_are_400() {
        let q: ListQuery = serde_urlencoded_from_str("limit=5&status=queued").expect("parses");
        assert_eq!(q.limit, Some(5));
        let w: WaitQuery = serde_urlencoded_from_str("wait=1.5").expect("parses");
        assert_eq!(w.wait, Some(1.5));
        for bad in [
            "limit=-1",
            "limit=x",
            "wait=soon",
            "max=1e3",
            "auto_ack=maybe",
        ] {
            let list = serde_urlencoded_from_str::<ListQuery>(bad).err();
            let wait = serde_urlencoded_from_str::<WaitQuery>(bad).err();
            let recv = serde_urlencoded_from_str::<ReceiveQuery>(bad).err();
            let e = list.or(wait).or(recv).expect("refused");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_parse_or_are_400(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            parse_every_body(&bytes)?;
        }

        #[test]
        fn arbitrary_json_parses_or_is_400(v in json()) {
            parse_every_body(v.to_string().as_bytes())?;
        }

        #[test]
        fn arbitrary_query_strings_parse_or_are_400(q in query()) {
            parse_every_query(&q)?;
        }
    }
}
