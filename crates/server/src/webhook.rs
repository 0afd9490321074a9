//! Webhook replies per Standard Webhooks: signing, the SSRF guard, and one
//! delivery attempt.
//!
//! - Signature: `webhook-signature: v1,<base64 HMAC-SHA256 of
//!   "{webhook-id}.{webhook-timestamp}.{body}">`, one `v1,` entry per
//!   configured secret (space-separated) so secrets can be rotated.
//! - SSRF: a target whose host resolves to any non-public address
//!   (loopback, private, link-local, CGNAT, unique-local, multicast,
//!   unspecified, documentation…) is refused at submit and re-checked at
//!   every attempt (DNS may change); the attempt then connects to exactly
//!   the addresses that were checked, and never follows redirects.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Decodes a `whsec_…` secret (base64 after the prefix).
pub fn parse_secret(s: &str) -> Result<Vec<u8>, String> {
    let b64 = s.trim().strip_prefix("whsec_").unwrap_or(s.trim());
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "a webhook secret must be whsec_ followed by base64".to_string())?;
    if key.len() < 16 {
        return Err("a webhook secret must decode to at least 16 bytes".into());
    }
    Ok(key)
}

/// The `webhook-signature` header value for a message.
pub fn sign(secrets: &[Vec<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|key| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether an address is on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 CGNAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 IETF
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
                || o[0] >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link local
                || (seg[0] == 0x2001 && seg[1] == 0xdb8) // documentation
                || (seg[0] == 0x64 && seg[1] == 0xff9b)) // NAT64 (may reach private v4)
        }
    }
}

/// Checks a target URL and resolves it: the addresses an attempt may
/// connect to. Refuses non-http(s) URLs, URLs with credentials, and —
/// unless `allow_private` — any host with a non-public address.
pub async fn resolve_target(
    url: &str,
    allow_private: bool,
) -> Result<(reqwest::Url, Vec<SocketAddr>), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err("must be an http or https URL".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("must not carry credentials".into());
    }
    let host = u
        .host_str()
        .ok_or("must have a host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = u.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map_err(|_| format!("resolving {host} timed out"))?
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect(),
    };
    if addrs.is_empty() {
        return Err(format!("{host} has no address"));
    }
    if !allow_private {
        if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(format!(
                "{host} resolves to {}, which is not a public address (the server refuses private, loopback and link-local targets)",
                bad.ip()
            ));
        }
    }
    Ok((u, addrs))
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// A 2xx answer.
    pub delivered: bool,
    /// The answer's status, if any.
    pub http_status: Option<u16>,
    /// What went wrong.
    pub message: String,
    /// Retrying is pointless (410 Gone). A target the guard refuses is
    /// retried on the schedule: DNS may change back.
    pub permanent: bool,
}

/// Makes one delivery attempt: re-checks the target, POSTs the signed body
/// to exactly the checked addresses, no redirects, within `timeout`.
pub async fn attempt(
    url: &str,
    message_id: &str,
    body: &str,
    secrets: &[Vec<u8>],
    timeout: Duration,
    allow_private: bool,
    now_unix: i64,
) -> Attempt {
    let fail = |message: String, permanent: bool| Attempt {
        delivered: false,
        http_status: None,
        message,
        permanent,
    };
    if secrets.is_empty() {
        // Never send an unsigned reply; retried on the schedule in case the
        // server is restarted with a secret.
        return fail(
            "the server has no --webhook-secret to sign with".into(),
            false,
        );
    }
    let (u, addrs) = match resolve_target(url, allow_private).await {
        Ok(t) => t,
        Err(e) => return fail(format!("target refused: {e}"), false),
    };
    let host = u.host_str().unwrap_or_default().to_string();
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .resolve_to_addrs(&host, &addrs)
        .build()
    {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot build the HTTP client: {e}"), false),
    };
    let resp = client
        .post(u)
        .header("content-type", "application/json")
        .header(
            "user-agent",
            concat!("coatcheck/", env!("CARGO_PKG_VERSION")),
        )
        .header("webhook-id", message_id)
        .header("webhook-timestamp", now_unix.to_string())
        .header(
            "webhook-signature",
            sign(secrets, message_id, now_unix, body.as_bytes()),
        )
        .body(body.to_string())
        .send()
        .await;
    match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            if r.status().is_success() {
                Attempt {
                    delivered: true,
                    http_status: Some(status),
                    message: String::new(),
                    permanent: false,
                }
            } else {
                Attempt {
                    delivered: false,
                    http_status: Some(status),
                    message: format!("the receiver answered {status}"),
                    permanent: status == 410,
                }
            }
        }
        Err(e) if e.is_timeout() => fail(
            format!("no answer within {} ms", timeout.as_millis()),
            false,
        ),
        Err(e) => fail(format!("delivery failed: {e}"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&[key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn non_public_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn targets_resolving_to_loopback_are_refused_unless_allowed() {
        assert!(resolve_target("http://127.0.0.1:9/x", false).await.is_err());
        assert!(resolve_target("http://[::1]:9/x", false).await.is_err());
        assert!(resolve_target("http://localhost:9/x", false).await.is_err());
        assert!(resolve_target("http://10.0.0.1/x", false).await.is_err());
        assert!(resolve_target("http://169.254.169.254/latest", false)
            .await
            .is_err());
        assert!(resolve_target("ftp://example.com/x", false).await.is_err());
        assert!(resolve_target("http://127.0.0.1:9/x", true).await.is_ok());
    }
}
