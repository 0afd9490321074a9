//! API keys: who may call, as which role, for which tenant and queues.
//!
//! A keys file (TOML) lists keys; each has a role (`client`, `worker`,
//! `admin`), a tenant, optionally the queues it may use, and either its
//! secret or — better — only the SHA-256 hash of it (`coatcheck keys new`
//! prints both). The server keeps only hashes in memory. A presented bearer
//! key is hashed and compared with **every** entry in constant time, so
//! neither the position of a match nor the length of a prefix shows in the
//! timing.
//!
//! ```toml
//! [[key]]
//! name = "web-frontend"
//! hash = "sha256:3b1f…"      # or: secret = "ck_…"
//! role = "client"
//! tenant = "acme"
//! queues = ["thumbnails"]    # optional: only these queues
//! ```

use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Submit, read, wait for, cancel its tenant's requests; use its channels.
    Client,
    /// Claim, heartbeat, complete and fail on its queues (any tenant).
    Worker,
    /// Everything, across tenants: redrive, `/v1/queues`, metrics.
    Admin,
}

impl Role {
    /// The name as in the keys file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }
}

/// One configured key (its secret is never kept).
#[derive(Debug, Clone)]
pub struct KeyEntry {
    /// A name for logs.
    pub name: String,
    /// The role.
    pub role: Role,
    /// The tenant.
    pub tenant: String,
    /// The queues it may use (`None`: all).
    pub queues: Option<Vec<String>>,
    digest: [u8; 32],
}

/// The configured keys.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    entries: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    key: Vec<RawKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Option<String>,
    secret: Option<String>,
    hash: Option<String>,
    role: Role,
    tenant: String,
    queues: Option<Vec<String>>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The hash form of a key as the keys file holds it: `sha256:<hex>`.
pub fn hash_key(secret: &str) -> String {
    format!("sha256:{}", hex::encode(digest(secret)))
}

/// A new random key: `ck_` and 32 random bytes, base64url.
pub fn new_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "ck_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// A TOML error as "line L, column C: message". toml's own `Display`
/// quotes the offending source line, which may hold a key's secret, and
/// this text ends up in the log (a failed SIGHUP reload) — so it is not used.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("line {line}, column {column}: {msg}")
        }
        None => msg,
    }
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Keys {
    /// Reads and checks a keys file.
    pub fn load(path: &Path) -> Result<Keys, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the keys file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("keys file {}: {e}", path.display()))
    }

    /// Parses keys-file text.
    pub fn parse(text: &str) -> Result<Keys, String> {
        let file: File = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        let mut entries = Vec::with_capacity(file.key.len());
        for (i, k) in file.key.into_iter().enumerate() {
            let name = k.name.unwrap_or_else(|| format!("key-{}", i + 1));
            let digest = match (k.secret, k.hash) {
                (Some(s), None) => {
                    if s.len() < 16 {
                        return Err(format!("{name}: a secret must be at least 16 characters"));
                    }
                    digest(&s)
                }
                (None, Some(h)) => {
                    let hexed = h
                        .strip_prefix("sha256:")
                        .ok_or_else(|| format!("{name}: hash must be sha256:<hex>"))?;
                    let bytes =
                        hex::decode(hexed).map_err(|_| format!("{name}: hash is not hex"))?;
                    bytes
                        .try_into()
                        .map_err(|_| format!("{name}: hash must be 32 bytes"))?
                }
                _ => return Err(format!("{name}: give exactly one of secret or hash")),
            };
            coatcheck_core::validate::text("tenant", &k.tenant, 128)
                .map_err(|e| format!("{name}: {e}"))?;
            if k.tenant.is_empty() {
                return Err(format!("{name}: tenant must not be empty"));
            }
            if let Some(qs) = &k.queues {
                for q in qs {
                    coatcheck_core::validate::name("queues", q)
                        .map_err(|e| format!("{name}: {e}"))?;
                }
            }
            // Names key the per-key stream slots and the logs; a repeated
            // secret would make the role depend on the order of entries.
            if entries.iter().any(|e: &KeyEntry| e.name == name) {
                return Err(format!("{name}: two keys have this name"));
            }
            if entries.iter().any(|e: &KeyEntry| ct_eq(&e.digest, &digest)) {
                return Err(format!("{name}: the same key is listed twice"));
            }
            entries.push(KeyEntry {
                name,
                role: k.role,
                tenant: k.tenant,
                queues: k.queues,
                digest,
            });
        }
        Ok(Keys { entries })
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no keys are configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry a presented secret belongs to. Every entry is compared, in
    /// constant time, whatever matches.
    pub fn authenticate(&self, secret: &str) -> Option<&KeyEntry> {
        let d = digest(secret);
        let mut found = None;
        for e in &self.entries {
            if ct_eq(&e.digest, &d) && found.is_none() {
                found = Some(e);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_hashes_authenticate_and_others_do_not() {
        let secret = new_key();
        let text = format!(
            "[[key]]\nname = \"a\"\nsecret = \"0123456789abcdef\"\nrole = \"client\"\ntenant = \"t1\"\n\n\
             [[key]]\nname = \"b\"\nhash = \"{}\"\nrole = \"worker\"\ntenant = \"t2\"\nqueues = [\"q\"]\n",
            hash_key(&secret)
        );
        let keys = Keys::parse(&text).unwrap();
        assert_eq!(keys.authenticate("0123456789abcdef").unwrap().name, "a");
        let b = keys.authenticate(&secret).unwrap();
        assert_eq!((b.role, b.tenant.as_str()), (Role::Worker, "t2"));
        assert!(
            keys.authenticate("0123456789abcde").is_none(),
            "a prefix is not the key"
        );
        assert!(keys.authenticate("").is_none());
        assert!(keys.authenticate(&format!("{secret}x")).is_none());
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        for (text, needle) in [
            ("[[key]]\nrole = \"client\"\ntenant = \"t\"\n", "exactly one of secret or hash"),
            ("[[key]]\nsecret = \"short\"\nrole = \"client\"\ntenant = \"t\"\n", "at least 16"),
            ("[[key]]\nsecret = \"0123456789abcdef\"\nrole = \"root\"\ntenant = \"t\"\n", "unknown variant"),
            ("[[key]]\nhash = \"md5:00\"\nrole = \"client\"\ntenant = \"t\"\n", "sha256"),
            ("[[key]]\nsecret = \"0123456789abcdef\"\nrole = \"client\"\ntenant = \"t\"\nqueues = [\"a b\"]\n", "queues"),
            ("[[key]]\nname = \"k\"\nsecret = \"0123456789abcdef\"\nrole = \"client\"\ntenant = \"t\"\n\
              [[key]]\nname = \"k\"\nsecret = \"0123456789abcdefg\"\nrole = \"client\"\ntenant = \"t\"\n", "two keys have this name"),
            ("[[key]]\nsecret = \"0123456789abcdef\"\nrole = \"client\"\ntenant = \"t\"\n\
              [[key]]\nsecret = \"0123456789abcdef\"\nrole = \"admin\"\ntenant = \"t\"\n", "listed twice"),
        ] {
            let e = Keys::parse(text).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn parse_errors_never_quote_the_file() {
        // A syntax error on a secret's line: the error names the place only.
        let text =
            "[[key]]\nrole = \"client\"\ntenant = \"t\"\nsecret = \"ck_do_not_log_me_0123\" oops\n";
        let e = Keys::parse(text).unwrap_err();
        assert!(!e.contains("ck_do_not_log_me"), "{e}");
        assert!(e.starts_with("line 4, column "), "{e}");
    }
}
