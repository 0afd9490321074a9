//! The connection URL, parsed once into what the store needs.
//!
//! A `postgres://` (or `postgresql://`) URL as libpq and tokio-postgres
//! understand it, plus two parameters of coatcheck's own, which are removed
//! before the rest is handed to tokio-postgres:
//!
//! - `schema=NAME`: keep every table in this schema (created if missing)
//!   instead of the database's default search path. Tests give each case a
//!   schema of its own; operators may share one database among several
//!   coatcheck clusters this way.
//! - `pool_size=N`: connections each node keeps at most (default 10).
//! - `sslmode` and `sslrootcert`: TLS to the database (`crate::tls`), read
//!   here because coatcheck gives them meanings of its own: `disable` (also
//!   the default when absent), `prefer` (TLS when the server offers it, its
//!   certificate not checked, as libpq), `require` (TLS or no connection,
//!   certificate not checked, as libpq without a root certificate) and
//!   `verify-full` (TLS, and the certificate must chain to `sslrootcert` — a
//!   PEM file — or to the public web roots, and name the host), `verify-ca`
//!   (TLS, and the certificate must chain to `sslrootcert`, which it needs;
//!   the host name is not checked). Other modes, and `sslrootcert` with a
//!   mode that checks no certificate, are refused, so that nothing is
//!   checked less than the URL seems to say.
//! - `sslcert` and `sslkey`: a client certificate and its key (PEM files),
//!   presented to a server that asks for one; both or neither, and only
//!   with a mode that uses TLS.
//!
//! Every connection also gets `application_name=coatcheck` (unless the URL
//! names one), a 5 s connect timeout, TCP keep-alives, a 30 s TCP user
//! timeout, and server-side
//! guards: `lock_timeout`, `statement_timeout` and
//! `idle_in_transaction_session_timeout`, so a stuck node can neither hold
//! row locks for long nor make other nodes wait without bound.

use std::str::FromStr;
use std::time::Duration;

/// The default number of pooled connections per node.
pub const DEFAULT_POOL_SIZE: usize = 10;

/// How long a call waits for a pooled connection (or for a new one to be
/// made) before it answers "unavailable".
pub const POOL_WAIT: Duration = Duration::from_secs(5);

/// How long sent data may stay unacknowledged before a connection is closed
/// (`TCP_USER_TIMEOUT`), unless the URL's `tcp_user_timeout` says otherwise.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// How connections to the database are encrypted (`sslmode=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP (`disable`, or no `sslmode`).
    Off,
    /// TLS if the server offers it, certificate not checked (`prefer`).
    Prefer,
    /// TLS or no connection, certificate not checked (`require`).
    Require,
    /// TLS, certificate checked against these roots (a PEM file) or the
    /// public web roots, and the host name (`verify-full`).
    VerifyFull {
        /// `sslrootcert`.
        roots: Option<std::path::PathBuf>,
    },
    /// TLS, certificate checked against these roots (a PEM file), but not
    /// the host name (`verify-ca`): for a database reached by an address its
    /// certificate does not name, under a private CA.
    VerifyCa {
        /// `sslrootcert` (required: any public CA would vouch for anyone's
        /// certificate when the name is not checked).
        roots: std::path::PathBuf,
    },
}

/// The certificate a node presents to the database (`sslcert`, `sslkey`):
/// for servers that authenticate clients by certificate (`pg_hba.conf`
/// method `cert`, or `clientcert=verify-ca|verify-full`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// `sslcert`: a PEM file with the certificate, then any intermediates.
    pub cert: std::path::PathBuf,
    /// `sslkey`: a PEM file with its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

/// A parsed store URL.
#[derive(Clone)]
pub struct PgOptions {
    /// What tokio-postgres connects with.
    pub pg: tokio_postgres::Config,
    /// TLS to the database.
    pub tls: TlsMode,
    /// The certificate to present, if the URL names one.
    pub client_cert: Option<ClientCert>,
    /// The schema every table lives in, if not the default search path.
    pub schema: Option<String>,
    /// Pooled connections per node.
    pub pool_size: usize,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("PgOptions")
            .field("hosts", &self.pg.get_hosts())
            .field("dbname", &self.pg.get_dbname())
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("tls", &self.tls)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

/// Why a URL was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid PostgreSQL URL: {0}")]
pub struct UrlError(pub String);

/// Whether `s` may be used as a schema name without quoting: lower-case
/// ASCII letters, digits and `_`, not starting with a digit, at most 63 bytes.
pub fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl PgOptions {
    /// Parses a store URL.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(UrlError("it must start with postgres://".into()));
        }
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut schema = None;
        let mut pool_size = DEFAULT_POOL_SIZE;
        let mut sslmode = None;
        let mut sslrootcert = None;
        let (mut sslcert, mut sslkey) = (None, None);
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "schema" => {
                    if !valid_schema(v) {
                        return Err(UrlError(format!(
                            "schema {v:?} must be lower-case letters, digits and _ (at most 63)"
                        )));
                    }
                    schema = Some(v.to_string());
                }
                "pool_size" => {
                    pool_size = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=1000).contains(n))
                        .ok_or_else(|| UrlError(format!("pool_size {v:?} must be 1..1000")))?;
                }
                "sslmode" => sslmode = Some(v.to_string()),
                "sslrootcert" => sslrootcert = Some(std::path::PathBuf::from(v)),
                "sslcert" => sslcert = Some(std::path::PathBuf::from(v)),
                "sslkey" => sslkey = Some(std::path::PathBuf::from(v)),
                _ => rest.push(pair),
            }
        }
        let tls = match (sslmode.as_deref(), sslrootcert) {
            (Some("verify-full"), roots) => TlsMode::VerifyFull { roots },
            (Some("verify-ca"), Some(roots)) => TlsMode::VerifyCa { roots },
            (Some("verify-ca"), None) => {
                return Err(UrlError(
                    "sslmode=verify-ca needs sslrootcert (the CA to check the certificate against)"
                        .into(),
                ))
            }
            (_, Some(_)) => {
                return Err(UrlError(
                    "sslrootcert is only used with sslmode=verify-full or verify-ca".into(),
                ))
            }
            (None | Some("disable"), None) => TlsMode::Off,
            (Some("prefer"), None) => TlsMode::Prefer,
            (Some("require"), None) => TlsMode::Require,
            (Some(other), None) => {
                return Err(UrlError(format!(
                "sslmode {other:?} is not supported: use disable, prefer, require, verify-ca or verify-full"
            )))
            }
        };
        let client_cert = match (sslcert, sslkey) {
            (None, None) => None,
            (Some(cert), Some(key)) if tls != TlsMode::Off => Some(ClientCert { cert, key }),
            (Some(_), Some(_)) => return Err(UrlError(
                "sslcert and sslkey need TLS: sslmode=prefer, require, verify-ca or verify-full"
                    .into(),
            )),
            _ => {
                return Err(UrlError(
                    "sslcert and sslkey go together (the certificate and its private key)".into(),
                ))
            }
        };
        let pg_url = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut pg =
            tokio_postgres::Config::from_str(&pg_url).map_err(|e| UrlError(e.to_string()))?;
        pg.ssl_mode(match tls {
            TlsMode::Off => tokio_postgres::config::SslMode::Disable,
            TlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyFull { .. } | TlsMode::VerifyCa { .. } => {
                tokio_postgres::config::SslMode::Require
            }
        });
        if pg.get_application_name().is_none() {
            pg.application_name("coatcheck");
        }
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        pg.keepalives(true)
            .keepalives_idle(Duration::from_secs(15))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        // Keep-alives probe only an idle connection; a query sent into a
        // network path that went dark would otherwise wait for the kernel's
        // retransmissions (about 15 minutes) before failing.
        if pg.get_tcp_user_timeout().is_none() {
            pg.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        let mut options = pg.get_options().unwrap_or_default().to_string();
        let mut add = |o: &str| {
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(o);
        };
        add("-c lock_timeout=10s");
        add("-c statement_timeout=60s");
        add("-c idle_in_transaction_session_timeout=60s");
        // Every hot statement is prepared once per connection, and after five
        // runs PostgreSQL keeps a generic plan for it. Planned while the
        // tables are still small (a fresh deployment; or autovacuum off, so
        // no ANALYZE ever invalidates it), that plan scans the whole table
        // and keeps doing so as the table grows: the batched
        // `UPDATE … FROM unnest(…)` then tested `id = ANY($1)` on every row
        // (measured: 0.59k echo round trips/s instead of 2.4k). Every query
        // of this store is meant to use an index; this makes the planner
        // pick one whenever there is one.
        add("-c enable_seqscan=off");
        if let Some(s) = &schema {
            add(&format!("-c search_path={s}"));
        }
        pg.options(options);
        Ok(PgOptions {
            pg,
            tls,
            client_cert,
            schema,
            pool_size,
        })
    }

    /// The schema name as the advisory lock and notification channel see it.
    pub fn schema_or_default(&self) -> &str {
        self.schema.as_deref().unwrap_or("public")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_and_pool_size_are_taken_out_of_the_url() {
        let o = PgOptions::parse(
            "postgres://postgres@127.0.0.1:5432/test?schema=cc_a1&pool_size=3&application_name=x",
        )
        .unwrap();
        assert_eq!(o.schema.as_deref(), Some("cc_a1"));
        assert_eq!(o.pool_size, 3);
        assert_eq!(o.pg.get_application_name(), Some("x"));
        assert!(o.pg.get_options().unwrap().contains("search_path=cc_a1"));
        assert_eq!(o.pg.get_dbname(), Some("test"));
    }

    #[test]
    fn sslmode_and_sslrootcert_are_read_here() {
        let mode = |q: &str| PgOptions::parse(&format!("postgres://h/db{q}")).map(|o| o.tls);
        assert_eq!(mode("").unwrap(), TlsMode::Off);
        assert_eq!(mode("?sslmode=disable").unwrap(), TlsMode::Off);
        assert_eq!(mode("?sslmode=prefer").unwrap(), TlsMode::Prefer);
        assert_eq!(mode("?sslmode=require").unwrap(), TlsMode::Require);
        assert_eq!(
            mode("?sslmode=verify-full").unwrap(),
            TlsMode::VerifyFull { roots: None }
        );
        assert_eq!(
            mode("?sslmode=verify-full&sslrootcert=/etc/ca.pem").unwrap(),
            TlsMode::VerifyFull {
                roots: Some("/etc/ca.pem".into())
            }
        );
        assert_eq!(
            mode("?sslmode=verify-ca&sslrootcert=/etc/ca.pem").unwrap(),
            TlsMode::VerifyCa {
                roots: "/etc/ca.pem".into()
            }
        );
        for bad in [
            "?sslmode=verify-ca",
            "?sslmode=allow",
            "?sslmode=",
            "?sslmode=require&sslrootcert=/etc/ca.pem",
        ] {
            let e = mode(bad).unwrap_err().to_string();
            assert!(e.contains("ssl"), "{bad}: {e}");
        }
        let o = PgOptions::parse("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(
            o.pg.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn sslcert_and_sslkey_go_together_and_need_tls() {
        let o = PgOptions::parse("postgres://h/db?sslmode=require&sslcert=/c.pem&sslkey=/k.pem")
            .unwrap();
        assert_eq!(
            o.client_cert,
            Some(ClientCert {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            })
        );
        assert_eq!(
            PgOptions::parse("postgres://h/db").unwrap().client_cert,
            None
        );
        for bad in [
            "?sslmode=require&sslcert=/c.pem",
            "?sslmode=require&sslkey=/k.pem",
            "?sslcert=/c.pem&sslkey=/k.pem",
            "?sslmode=disable&sslcert=/c.pem&sslkey=/k.pem",
        ] {
            let e = PgOptions::parse(&format!("postgres://h/db{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("sslcert and sslkey"), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_schema_names_and_other_schemes_are_refused() {
        assert!(PgOptions::parse("postgres://h/db?schema=Robert'); DROP").is_err());
        assert!(PgOptions::parse("postgres://h/db?schema=1abc").is_err());
        assert!(PgOptions::parse("mysql://h/db").is_err());
        assert!(PgOptions::parse("postgres://h/db?pool_size=0").is_err());
        let o = PgOptions::parse("postgresql://h/db").unwrap();
        assert_eq!(o.schema, None);
        assert_eq!(o.pool_size, DEFAULT_POOL_SIZE);
    }

    #[test]
    fn connections_get_a_tcp_user_timeout_unless_the_url_sets_one() {
        let o = PgOptions::parse("postgres://h/db").unwrap();
        assert_eq!(o.pg.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        let o = PgOptions::parse("postgres://h/db?tcp_user_timeout=7").unwrap();
        assert_eq!(o.pg.get_tcp_user_timeout(), Some(&Duration::from_secs(7)));
    }
}
