//! Page tokens of `GET /v1/requests`: opaque to clients, tamper-evident,
//! and bound to the caller they were issued to (AIP-158).
//!
//! A token is `base64url(version ‖ len ‖ before_id ‖ scope ‖ tag)`:
//! - `version` (1 byte, [`VERSION`]) — lets a later format be told apart;
//! - `len` (1 byte) and `before_id` — the cursor: the last request id of
//!   the page, the next page lists ids strictly below it;
//! - `scope` (16 bytes) — a hash of the tenant scope of the caller it was
//!   issued to (a client's tenant, or "every tenant" for admins and
//!   workers), so a token cannot be replayed by another tenant;
//! - `tag` (32 bytes) — HMAC-SHA256 of all of the above under the server's
//!   page-token key.
//!
//! The key is a store secret ([`SECRET_NAME`], see
//! `Store::store_secret`): the same after a restart and on every node
//! sharing a PostgreSQL store, so a token issued by one node pages on
//! another. A token that does not verify — altered, forged, truncated,
//! issued under another key or to another caller — is a `400` problem with
//! `field: page_token`, never another page, never a 500.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::problem::ApiError;
use coatcheck_core::validate;

/// The name of the page-token key among the store's secrets.
pub const SECRET_NAME: &str = "page-token";

/// The token format this server writes.
pub const VERSION: u8 = 1;

const SCOPE_LEN: usize = 16;
const TAG_LEN: usize = 32;
/// The longest token text read at all (a real one is about 120 characters).
const MAX_TOKEN: usize = 1024;

type HmacSha256 = Hmac<Sha256>;

/// Issues and checks page tokens under one key.
#[derive(Clone)]
pub struct PageTokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens(..)")
    }
}

/// The hash of a tenant scope (`None`: every tenant).
fn scope_hash(scope: Option<&str>) -> [u8; SCOPE_LEN] {
    let mut h = Sha256::new();
    h.update(b"coatcheck page-token scope\0");
    match scope {
        None => h.update(b"*"),
        Some(t) => {
            h.update(b"tenant\0");
            h.update(t.as_bytes());
        }
    }
    let full = h.finalize();
    let mut out = [0u8; SCOPE_LEN];
    out.copy_from_slice(&full[..SCOPE_LEN]);
    out
}

fn invalid(detail: &str) -> ApiError {
    ApiError::bad_request(format!("page_token {detail}")).with("field", "page_token")
}

impl PageTokens {
    /// Tokens under `key` (at least 16 bytes; the store's secret is 32).
    pub fn new(key: &[u8]) -> Self {
        PageTokens { key: key.to_vec() }
    }

    /// Tokens under a fresh random key (an engine not yet given the store's).
    pub fn random() -> Self {
        Self::new(&rand::random::<[u8; 32]>())
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length.
        HmacSha256::new_from_slice(&self.key).expect("HMAC accepts any key length")
    }

    /// The token that continues a listing for `scope` after `before_id`.
    pub fn encode(&self, scope: Option<&str>, before_id: &str) -> String {
        let id = before_id.as_bytes();
        let len = u8::try_from(id.len()).expect("request ids are short");
        let mut buf = Vec::with_capacity(2 + id.len() + SCOPE_LEN + TAG_LEN);
        buf.push(VERSION);
        buf.push(len);
        buf.extend_from_slice(id);
        buf.extend_from_slice(&scope_hash(scope));
        let mut mac = self.mac();
        mac.update(&buf);
        buf.extend_from_slice(&mac.finalize().into_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
    }

    /// The `before_id` of a token this server issued to `scope`; anything
    /// else is a 400 problem (`field: page_token`).
    pub fn decode(&self, scope: Option<&str>, token: &str) -> Result<String, ApiError> {
        const NOT_OURS: &str = "is not a token this server issued";
        if token.len() > MAX_TOKEN {
            return Err(invalid(NOT_OURS));
        }
        let buf = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| invalid(NOT_OURS))?;
        if buf.len() < 2 + SCOPE_LEN + TAG_LEN || buf[0] != VERSION {
            return Err(invalid(NOT_OURS));
        }
        let id_len = buf[1] as usize;
        if buf.len() != 2 + id_len + SCOPE_LEN + TAG_LEN {
            return Err(invalid(NOT_OURS));
        }
        let (signed, tag) = buf.split_at(buf.len() - TAG_LEN);
        let mut mac = self.mac();
        mac.update(signed);
        // Constant time: a forger learns nothing from how fast we refuse.
        mac.verify_slice(tag).map_err(|_| invalid(NOT_OURS))?;
        let id = &signed[2..2 + id_len];
        let issued_to = &signed[2 + id_len..];
        if issued_to != scope_hash(scope) {
            return Err(invalid("was issued to another caller"));
        }
        let id = std::str::from_utf8(id).map_err(|_| invalid(NOT_OURS))?;
        if !validate::request_id(id) {
            return Err(invalid(NOT_OURS));
        }
        Ok(id.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use proptest::prelude::*;

    const ID: &str = "0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77";

    fn tokens() -> PageTokens {
        PageTokens::new(&[7u8; 32])
    }

    fn assert_refused(res: Result<String, ApiError>) {
        let e = res.expect_err("refused");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let p = e.problem();
        assert_eq!(p.extensions["field"], "page_token");
    }

    #[test]
    fn a_token_round_trips_for_its_scope() {
        let t = tokens();
        for scope in [None, Some("tenant-a"), Some("")] {
            let tok = t.encode(scope, ID);
            assert_eq!(t.decode(scope, &tok).expect("decodes"), ID);
            assert!(
                tok.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "URL-safe: {tok}"
            );
        }
    }

    #[test]
    fn a_token_of_another_tenant_or_key_is_refused() {
        let t = tokens();
        let tok = t.encode(Some("tenant-a"), ID);
        assert_refused(t.decode(Some("tenant-b"), &tok));
        assert_refused(t.decode(None, &tok));
        assert_refused(t.decode(Some("tenant-a"), &t.encode(None, ID)));
        let other = PageTokens::new(&[8u8; 32]);
        assert_refused(other.decode(Some("tenant-a"), &tok));
    }

    #[test]
    fn the_old_unsigned_format_is_refused() {
        let old = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{ID}"));
        assert_refused(tokens().decode(None, &old));
    }

    #[test]
    fn a_forged_token_with_a_valid_shape_is_refused() {
        // Right version, length and scope, but a tag made without the key.
        let mut buf = vec![VERSION, ID.len() as u8];
        buf.extend_from_slice(ID.as_bytes());
        buf.extend_from_slice(&scope_hash(None));
        buf.extend_from_slice(&[0u8; TAG_LEN]);
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf);
        assert_refused(tokens().decode(None, &forged));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_text_is_refused_never_a_panic(s in "\\PC{0,200}") {
            assert_refused(tokens().decode(Some("t"), &s));
        }

        #[test]
        fn random_base64_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            assert_refused(tokens().decode(None, &s));
        }

        #[test]
        fn a_bit_flipped_token_is_refused(
            scope in proptest::option::of("[a-z]{0,12}"),
            bit in any::<proptest::sample::Index>(),
        ) {
            let t = tokens();
            let tok = t.encode(scope.as_deref(), ID);
            let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&tok)
                .expect("our own token decodes");
            let i = bit.index(raw.len() * 8);
            raw[i / 8] ^= 1 << (i % 8);
            let flipped = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
            assert_refused(t.decode(scope.as_deref(), &flipped));
        }

        #[test]
        fn a_truncated_or_extended_token_is_refused(
            cut in 0usize..120,
            extra in "[A-Za-z0-9_-]{1,8}",
        ) {
            let t = tokens();
            let tok = t.encode(None, ID);
            let cut = cut.min(tok.len() - 1);
            assert_refused(t.decode(None, &tok[..cut]));
            assert_refused(t.decode(None, &format!("{tok}{extra}")));
        }

        #[test]
        fn any_request_id_round_trips(id in "[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}") {
            prop_assume!(validate::request_id(&id));
            let t = tokens();
            prop_assert_eq!(t.decode(Some("x"), &t.encode(Some("x"), &id)).expect("decodes"), id);
        }
    }
}
