//! The SDK against a real coatcheck server (`coatcheck_testkit::TestServer`:
//! a real server on 127.0.0.1:0 over the embedded store in a temp dir).

mod channel;
mod client;
mod events;
mod journal;
mod proxy;
mod resilience;
mod webhook;
mod worker;

use std::time::Duration;

use coatcheck_client::Client;
use coatcheck_testkit::TestServer;

/// A client of `s` with a short per-call timeout.
pub fn client(s: &TestServer) -> Client {
    Client::builder(s.base_url())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Polls `f` until it is true or `within` passed.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = std::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if std::time::Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Claims one request of `queue` (waiting up to 5 s for it), with a 60 s lease.
pub async fn claim_one(c: &Client, queue: &str) -> coatcheck_client::wire::ClaimedRequest {
    c.claim(
        queue,
        coatcheck_client::wire::ClaimBody {
            worker_id: "sdk-test".into(),
            max: Some(1),
            lease: Some(60.0),
            wait: Some(5.0),
        },
    )
    .await
    .unwrap()
    .remove(0)
}
