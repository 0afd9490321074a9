//! `webhook::verify`: against the Standard Webhooks test vector, against
//! signatures made by the server's own signer (with rotation), end to end on
//! a real delivery from a running server, and its refusals.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coatcheck_client::webhook::{self, VerifyError, DEFAULT_TOLERANCE};
use coatcheck_client::{ReplyTo, WebhookTarget};
use coatcheck_server::webhook::{parse_secret, sign};
use coatcheck_testkit::TestServer;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client;

const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const VECTOR_TS: &str = "1614265330";
const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
const VECTOR_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

const OLD: &str = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24tdGVzdHM=";
const OTHER: &str = "whsec_dGhpcmQtc2VjcmV0LW5vYm9keS1zaWducy13aXRo";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn at(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs as u64)
}

#[test]
fn the_standard_webhooks_test_vector() {
    let t = 1614265330;
    webhook::verify_at(
        &[VECTOR_SECRET],
        (VECTOR_ID, VECTOR_TS, VECTOR_SIG),
        VECTOR_BODY,
        DEFAULT_TOLERANCE,
        at(t),
    )
    .unwrap();
    assert_eq!(
        webhook::sign(VECTOR_SECRET, VECTOR_ID, t, VECTOR_BODY).unwrap(),
        VECTOR_SIG
    );
    // The server's signer agrees.
    let key = parse_secret(VECTOR_SECRET).unwrap();
    assert_eq!(sign(&[key], VECTOR_ID, t, VECTOR_BODY), VECTOR_SIG);
    // ±5 minutes, not a second more.
    for (skew, ok) in [
        (0, true),
        (300, true),
        (-300, true),
        (301, false),
        (-301, false),
    ] {
        let r = webhook::verify_at(
            &[VECTOR_SECRET],
            (VECTOR_ID, VECTOR_TS, VECTOR_SIG),
            VECTOR_BODY,
            DEFAULT_TOLERANCE,
            at(t + skew),
        );
        assert_eq!(r.is_ok(), ok, "skew {skew}: {r:?}");
        if skew == 301 {
            assert!(matches!(r, Err(VerifyError::TooOld { .. })));
        }
        if skew == -301 {
            assert!(matches!(r, Err(VerifyError::TooNew { .. })));
        }
    }
}

#[test]
fn signatures_of_the_server_signer_with_rotation() {
    let keys = vec![
        parse_secret(VECTOR_SECRET).unwrap(),
        parse_secret(OLD).unwrap(),
    ];
    let ts = now();
    let body = br#"{"message_id":"m1","request_id":"r1","status":"succeeded"}"#;
    let header = sign(&keys, "m1", ts, body);
    assert_eq!(header.split(' ').count(), 2, "{header}");
    let ts_text = ts.to_string();
    let h = ("m1", ts_text.as_str(), header.as_str());
    // Either secret alone verifies; so do both; a stranger's does not.
    webhook::verify(&[VECTOR_SECRET], h, body, DEFAULT_TOLERANCE).unwrap();
    webhook::verify(&[OLD], h, body, DEFAULT_TOLERANCE).unwrap();
    webhook::verify(&[OTHER, OLD], h, body, DEFAULT_TOLERANCE).unwrap();
    assert_eq!(
        webhook::verify(&[OTHER], h, body, DEFAULT_TOLERANCE),
        Err(VerifyError::NoMatchingSignature)
    );
    // Any change to id, timestamp or body breaks it.
    let later = (ts + 1).to_string();
    for (id, t, b) in [
        ("m2", ts_text.as_str(), &body[..]),
        ("m1", later.as_str(), &body[..]),
        ("m1", ts_text.as_str(), &br#"{"message_id":"m1"}"#[..]),
    ] {
        assert_eq!(
            webhook::verify(
                &[VECTOR_SECRET, OLD],
                (id, t, header.as_str()),
                b,
                DEFAULT_TOLERANCE
            ),
            Err(VerifyError::NoMatchingSignature)
        );
    }
    // A replay of a signature from an hour ago is refused, even though it is genuine.
    let old_ts = ts - 3600;
    let old_sig = sign(&keys, "m1", old_ts, body);
    let old_text = old_ts.to_string();
    assert!(matches!(
        webhook::verify(
            &[VECTOR_SECRET],
            ("m1", old_text.as_str(), old_sig.as_str()),
            body,
            DEFAULT_TOLERANCE
        ),
        Err(VerifyError::TooOld { .. })
    ));
    // …unless the receiver allows that much.
    webhook::verify(
        &[VECTOR_SECRET],
        ("m1", old_text.as_str(), old_sig.as_str()),
        body,
        Duration::from_secs(7200),
    )
    .unwrap();
}

/// One HTTP request received by [`receive_one`].
struct Received {
    headers: HeaderMap,
    body: Vec<u8>,
}

/// A one-shot HTTP receiver: answers the first POST with 200 and hands it over.
async fn receive_one(listener: tokio::net::TcpListener) -> Received {
    let (mut sock, _) = listener.accept().await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed before the headers ended");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut headers = HeaderMap::new();
    for line in head.lines().skip(1).filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once(':').unwrap();
        headers.append(
            HeaderName::from_bytes(k.trim().as_bytes()).unwrap(),
            HeaderValue::from_str(v.trim()).unwrap(),
        );
    }
    let len: usize = headers
        .get("content-length")
        .map(|v| v.to_str().unwrap().parse().unwrap())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        body.extend_from_slice(&chunk[..n]);
    }
    sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let _ = sock.shutdown().await;
    Received { headers, body }
}

#[tokio::test]
async fn a_real_delivery_verifies_with_the_sdk() {
    let s = TestServer::start_with(|cfg| {
        cfg.webhook_secrets = vec![
            parse_secret(VECTOR_SECRET).unwrap(),
            parse_secret(OLD).unwrap(),
        ];
        cfg.webhook_allow_private = true;
    })
    .await;
    let c = client(&s);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let receiver = tokio::spawn(receive_one(listener));
    let sub = c
        .submit("hooked", &json!({"n": 1}))
        .correlation_id("order-7")
        .reply_to(ReplyTo::Webhook(WebhookTarget { url }))
        .send()
        .await
        .unwrap();
    let job = crate::claim_one(&c, "hooked").await;
    c.complete(&job.id, &job.lease_token, &json!({"sum": 2}))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), receiver)
        .await
        .expect("the webhook arrives")
        .unwrap();

    // The receiver's side: the raw body and the headers as they came.
    webhook::verify(&[VECTOR_SECRET], &got.headers, &got.body, DEFAULT_TOLERANCE).unwrap();
    webhook::verify(&[OLD], &got.headers, &got.body, DEFAULT_TOLERANCE).unwrap();
    assert_eq!(
        webhook::verify(&[OTHER], &got.headers, &got.body, DEFAULT_TOLERANCE),
        Err(VerifyError::NoMatchingSignature)
    );
    let reply: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(reply["request_id"], sub.request.id.as_str());
    assert_eq!(reply["correlation_id"], "order-7");
    assert_eq!(reply["output"], json!({"sum": 2}));
    assert_eq!(
        got.headers.get("webhook-id").unwrap().to_str().unwrap(),
        reply["message_id"].as_str().unwrap()
    );
    // Tampered in transit: refused.
    let mut tampered = got.body.clone();
    let last = tampered.len() - 2;
    tampered[last] ^= 1;
    assert_eq!(
        webhook::verify(&[VECTOR_SECRET], &got.headers, &tampered, DEFAULT_TOLERANCE),
        Err(VerifyError::NoMatchingSignature)
    );
    // Without its headers: refused, naming what is missing.
    let mut bare = got.headers.clone();
    bare.remove("webhook-signature");
    assert_eq!(
        webhook::verify(&[VECTOR_SECRET], &bare, &got.body, DEFAULT_TOLERANCE),
        Err(VerifyError::MissingHeader("webhook-signature"))
    );
}
