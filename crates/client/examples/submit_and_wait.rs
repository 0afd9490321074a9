//! A client that submits a request and waits for its reply.
//!
//! ```sh
//! coatcheck serve --listen 127.0.0.1:8080 &
//! cargo run -p coatcheck-client --example thumbnailer &
//! cargo run -p coatcheck-client --example submit_and_wait
//! ```
//!
//! With `COATCHECK_JOURNAL=./pending.jsonl` the client keeps a durable journal:
//! kill it while it waits and the next run resumes waiting for what was pending.

use std::time::Duration;

use coatcheck_client::{Client, Error};
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct Thumbnail<'a> {
    url: &'a str,
    width: u32,
}

#[derive(Debug, Deserialize)]
struct Thumbnailed {
    url: String,
    bytes: u64,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("COATCHECK_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let mut builder = Client::builder(url);
    if let Ok(key) = std::env::var("COATCHECK_API_KEY") {
        builder = builder.api_key(key);
    }
    if let Ok(path) = std::env::var("COATCHECK_JOURNAL") {
        builder = builder.journal(path);
    }
    let client = builder.build()?;

    // Resume whatever a previous run left pending.
    if let Ok(pending) = client.pending() {
        for entry in pending {
            match entry.id {
                Some(id) => {
                    let done = client.wait(&id, Some(Duration::from_secs(60))).await?;
                    println!("resumed {id}: {}", done.status);
                }
                // Sent, but the answer never arrived: we cannot resend
                // without the input, so drop it (or resubmit the same input
                // with `.idempotency_key(entry.idempotency_key)`).
                None => {
                    client.forget(&entry.idempotency_key).await?;
                }
            }
        }
    }

    let ticket = client
        .submit(
            "thumbnails",
            &Thumbnail {
                url: "https://example.com/cat.png",
                width: 128,
            },
        )
        .correlation_id("order-42")
        .timeout(Duration::from_secs(600))
        .send()
        .await?;
    println!("submitted {} ({})", ticket.id(), ticket.request.status);

    match client
        .wait_result::<Thumbnailed>(ticket.id(), Some(Duration::from_secs(120)))
        .await
    {
        Ok(out) => println!("done: {} ({} bytes)", out.url, out.bytes),
        Err(e) if e.is_conflict() => {
            println!("it ended {:?}: {:?}", e.request_status(), e.request_error())
        }
        Err(e) => return Err(e),
    }
    Ok(())
}
