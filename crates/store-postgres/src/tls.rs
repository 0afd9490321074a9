//! TLS to PostgreSQL: one rustls connector for every connection of a node
//! (the pool, the listener, migrations), configured by `sslmode` in the
//! store URL ([`crate::config`]). With `sslmode=disable` (the default)
//! tokio-postgres never asks for TLS, so the connector goes unused.
//!
//! `prefer` and `require` encrypt without checking the server's
//! certificate — what libpq does for them without a root certificate: it
//! keeps the traffic from being read on the wire, not a server from being
//! impersonated. `verify-full` checks the chain (to `sslrootcert` or the
//! public web roots) and that the certificate names the host connected to;
//! `verify-ca` checks the chain to `sslrootcert` only (rustls's own check,
//! with a name mismatch — found after the chain was accepted — let through).
//!
//! With `sslcert` and `sslkey` the node presents that certificate (and any
//! intermediates after it in the file) when the server asks for one.

use std::sync::Arc;

use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::{ClientCert, TlsMode};

/// The connector for `mode`, presenting `client` if given; an unreadable or
/// empty `sslrootcert`, `sslcert` or `sslkey` is an error.
pub fn connector(mode: &TlsMode, client: Option<&ClientCert>) -> Result<MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let verifying = match mode {
        TlsMode::Off | TlsMode::Prefer | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Relaxed {
                provider,
                chain: None,
            })),
        TlsMode::VerifyFull { roots } => {
            let store = match roots {
                Some(path) => root_store(path)?,
                None => {
                    let mut store = rustls::RootCertStore::empty();
                    store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                    store
                }
            };
            builder.with_root_certificates(store)
        }
        TlsMode::VerifyCa { roots } => {
            let chain = WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(roots)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("sslrootcert {}: {e}", roots.display()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Relaxed {
                    provider,
                    chain: Some(chain),
                }))
        }
    };
    let config = match client {
        None => verifying.with_no_client_auth(),
        Some(c) => {
            let (chain, key) = client_identity(c)?;
            verifying.with_client_auth_cert(chain, key).map_err(|e| {
                format!(
                    "sslcert {} with sslkey {}: {e} (the certificate must be X.509 v3 — \
                     `openssl x509 -req` makes v1 unless given extensions — and the key its own)",
                    c.cert.display(),
                    c.key.display()
                )
            })?
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The certificate chain of `sslcert` and the key of `sslkey`.
fn client_identity(
    c: &ClientCert,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
        .and_then(|it| it.collect())
        .map_err(|e| format!("sslcert {}: {e}", c.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "sslcert {}: no certificate in it",
            c.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&c.key)
        .map_err(|e| format!("sslkey {}: {e}", c.key.display()))?;
    Ok((chain, key))
}

/// The certificates of the PEM file at `path`; none, or an unreadable file,
/// is an error.
fn root_store(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "sslrootcert {}: no certificate in it",
            path.display()
        ));
    }
    let mut store = rustls::RootCertStore::empty();
    for c in certs {
        store
            .add(c)
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    }
    Ok(store)
}

/// A verifier that checks less than rustls's own: for `prefer` and
/// `require` (`chain: None`) any certificate; for `verify-ca` the full check
/// of the chain (to `sslrootcert`, validity, usage, signatures) but not that
/// the certificate names the host. Either way the handshake's signatures
/// are checked, so the server must hold the certificate's key.
#[derive(Debug)]
struct Relaxed {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // rustls checks the name after the chain: a name mismatch means
            // the chain itself was accepted.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
