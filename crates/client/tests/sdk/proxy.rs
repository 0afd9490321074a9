//! A tiny TCP proxy in front of a test server, for injecting the network
//! failures an SDK must survive: an answer lost after the server acted on
//! the request, and connections cut in the middle of a stream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Default)]
struct Shared {
    /// Swallow the next answer: forward the request, read the server's
    /// answer up to the end of its headers, then close the client's side.
    lose_next_answer: AtomicBool,
    connections: AtomicUsize,
    answers_lost: AtomicUsize,
    live: Mutex<Vec<AbortHandle>>,
}

/// A proxy on 127.0.0.1 forwarding to `upstream`; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                sh.connections.fetch_add(1, Ordering::SeqCst);
                let lose = sh.lose_next_answer.swap(false, Ordering::SeqCst);
                let sh2 = sh.clone();
                let conn = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    if lose {
                        lose_answer(client, server, &sh2).await;
                    } else {
                        relay(client, server).await;
                    }
                });
                sh.live.lock().unwrap().push(conn.abort_handle());
            }
        });
        Proxy { addr, shared, task }
    }

    /// The base URL clients should use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next connection forwards its request but never relays the answer.
    pub fn lose_next_answer(&self) {
        self.shared.lose_next_answer.store(true, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Answers swallowed so far.
    pub fn answers_lost(&self) -> usize {
        self.shared.answers_lost.load(Ordering::SeqCst)
    }

    /// Cuts every open connection (both sides see it close).
    pub fn cut_all(&self) {
        for h in self.shared.live.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut_all();
        self.task.abort();
    }
}

async fn relay(mut client: TcpStream, mut server: TcpStream) {
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

async fn lose_answer(client: TcpStream, server: TcpStream, shared: &Shared) {
    let (mut client_rd, client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let upload = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_rd, &mut server_wr).await;
    });
    // Read the server's answer until its headers are complete: by then the
    // server has acted on the request (a 202 means it is durably stored).
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match server_rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    shared.answers_lost.fetch_add(1, Ordering::SeqCst);
    upload.abort();
    // Close the client's connection without a byte of the answer.
    let mut client_wr = client_wr;
    let _ = client_wr.shutdown().await;
    drop(client_wr);
}
