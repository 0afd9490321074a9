//! The accept loop: TCP → (optional) TLS → HTTP/1.1 → the axum router.
//!
//! We run our own loop instead of `axum::serve` for what it cannot do:
//! - TLS (rustls, ring provider) with a handshake deadline, and a
//!   certificate that can be swapped at run time ([`Tls::reload`], SIGHUP);
//! - a deadline for a request's head (`header_read_timeout`): a client
//!   that trickles its headers (slow-loris), connects and sends nothing,
//!   or leaves a keep-alive connection idle is disconnected when it passes
//!   (hyper starts the clock whenever it waits for a request head);
//! - graceful shutdown on the server's [`CancellationToken`]: stop
//!   accepting, let in-flight calls finish (long-polls answer at once, they
//!   watch the same token), close idle connections, and give up after the
//!   grace period.
//!
//! HTTP/1.1 only (as before: axum was built with `http1` alone).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;
use crate::engine::Engine;

/// The TLS side of the listener: the files it was loaded from and the
/// acceptor in force.
pub struct Tls {
    files: TlsConfig,
    acceptor: RwLock<TlsAcceptor>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

fn read_pem(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the TLS {what} {}", path.display()))
}

/// Builds a rustls server configuration from PEM files: the certificate
/// chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(files: &TlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    let cert_pem = read_pem("certificate", &files.cert_path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| {
            anyhow::anyhow!(
                "the TLS certificate {} is not a PEM certificate chain",
                files.cert_path.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "the TLS certificate {} holds no CERTIFICATE block",
            files.cert_path.display()
        );
    }
    let key_pem = read_pem("key", &files.key_path)?;
    // The error names the file, never its contents.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        anyhow::anyhow!(
            "the TLS key {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            files.key_path.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "the TLS key {} does not fit the certificate {}",
                files.key_path.display(),
                files.cert_path.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Tls {
    /// Loads the certificate and key.
    pub fn load(files: &TlsConfig) -> anyhow::Result<Tls> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(files)?));
        Ok(Tls {
            files: files.clone(),
            acceptor: RwLock::new(acceptor),
        })
    }

    /// Reads the files again; new connections use the new certificate. On
    /// error the one in force stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(&self.files)?));
        *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// An I/O stream that remembers whether bytes arrived since the last
/// response bytes went out, to tell a slow client (a request head begun
/// but not finished in time) from an idle keep-alive connection.
struct Watched<T> {
    inner: T,
    reading: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.reading.store(true, Ordering::Relaxed);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.reading.store(false, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.reading.store(false, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accept errors that concern one connection only (the peer went away
/// before we took it); anything else (out of file descriptors) is worth a
/// pause so the loop does not spin.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves `app` on `listener` until `shutdown` fires, then drains: no new
/// connections, in-flight calls may finish within `grace`, idle connections
/// close at once.
pub async fn run(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<Tls>>,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let header_timeout = engine.config.header_read_timeout;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection; pausing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let svc = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        // Taken before the handshake: a connection that finishes its
        // handshake after shutdown began is told to close at once.
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let engine = engine.clone();
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            let reading = Arc::new(AtomicBool::new(false));
            let served = match acceptor {
                None => {
                    let io = Watched {
                        inner: tcp,
                        reading: reading.clone(),
                    };
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(io), svc))
                        .await
                }
                Some(acceptor) => {
                    // A handshake still under way when shutdown begins is
                    // dropped, so it does not hold the drain up.
                    let shaken = tokio::select! {
                        r = handshake(acceptor, tcp, header_timeout) => r,
                        _ = stopping.cancelled() => return,
                    };
                    let stream = match shaken {
                        Ok(s) => s,
                        Err(timed_out) => {
                            if timed_out {
                                engine.metrics.refused("tls_handshake_timeout");
                            }
                            return;
                        }
                    };
                    let io = Watched {
                        inner: stream,
                        reading: reading.clone(),
                    };
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(io), svc))
                        .await
                }
            };
            if let Err(e) = served {
                // A timeout with part of a request head read is a slow client;
                // without, an idle keep-alive connection closed as designed.
                if e.is_timeout() && reading.load(Ordering::Relaxed) {
                    engine.metrics.refused("header_timeout");
                }
            }
        });
    }
    // Stop listening before draining, so new connections are refused at once.
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight calls did not finish within the grace period");
    }
}

/// The TLS handshake within `timeout`; `Err(true)` if it timed out,
/// `Err(false)` if the peer failed it (not TLS, no common cipher, …).
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, bool> {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(_)) => Err(false),
        Err(_) => Err(true),
    }
}
