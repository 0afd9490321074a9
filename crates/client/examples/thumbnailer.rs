//! A typed worker: a thumbnailer-like CPU task that reports progress and
//! stops when the client cancels.
//!
//! ```sh
//! cargo run -p coatcheck-client --example thumbnailer
//! ```

use std::time::Duration;

use coatcheck_client::{Client, Error, HandlerError, Job, Worker};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Deserialize)]
struct Thumbnail {
    url: String,
    width: u32,
}

#[derive(Serialize)]
struct Thumbnailed {
    url: String,
    bytes: u64,
}

async fn thumbnail(job: Job<Thumbnail>) -> Result<Thumbnailed, HandlerError> {
    if job.input.width == 0 || job.input.width > 4096 {
        // No retry can fix bad input.
        return Err(HandlerError::fatal("width must be 1..=4096").code("bad_width"));
    }
    let rows = 10;
    for row in 0..rows {
        if job.is_cancelled() {
            return Err(HandlerError::fatal("cancelled by the client").code("cancelled"));
        }
        // The CPU-heavy part runs off the async threads.
        let width = job.input.width;
        tokio::task::spawn_blocking(move || {
            std::hint::black_box((0..width * 1000).fold(0u32, u32::wrapping_add))
        })
        .await?;
        job.progress(json!({"rows_done": row + 1, "rows": rows}));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Thumbnailed {
        url: format!("{}?w={}", job.input.url, job.input.width),
        bytes: u64::from(job.input.width) * 42,
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("COATCHECK_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let client = Client::new(url)?;
    Worker::new(client, "thumbnails")
        .concurrency(4)
        .lease(Duration::from_secs(15))
        .on_event(|e| eprintln!("{e:?}"))
        .run(thumbnail, tokio::signal::ctrl_c())
        .await
}
