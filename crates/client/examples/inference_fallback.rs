//! An ML-inference style worker with a fallback: requests go to the `gpu`
//! queue with `fallback_queue: "cpu"`; when the GPU model gives up on one
//! (its attempts used up), the server resubmits the same input to `cpu`,
//! served by a slower model in the same process.
//!
//! ```sh
//! cargo run -p coatcheck-client --example inference_fallback
//! ```

use std::time::Duration;

use coatcheck_client::{CancellationToken, Client, Error, HandlerError, Job, Worker};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Prompt {
    text: String,
}

#[derive(Serialize, Deserialize, Debug)]
struct Completion {
    model: String,
    text: String,
}

async fn gpu_model(job: Job<Prompt>) -> Result<Completion, HandlerError> {
    // Pretend the GPU is out of memory for long prompts.
    if job.input.text.len() > 20 {
        return Err(HandlerError::retryable("CUDA out of memory")
            .code("oom")
            .retry_after(Duration::from_millis(200)));
    }
    Ok(Completion {
        model: "gpu-large".into(),
        text: job.input.text.to_uppercase(),
    })
}

async fn cpu_model(job: Job<Prompt>) -> Result<Completion, HandlerError> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Completion {
        model: "cpu-small".into(),
        text: job.input.text.to_lowercase(),
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("COATCHECK_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let client = Client::new(url)?;
    let stop = CancellationToken::new();
    let gpu = tokio::spawn(
        Worker::new(client.clone(), "gpu")
            .concurrency(2)
            .run_until(gpu_model, stop.clone()),
    );
    let cpu = tokio::spawn(
        Worker::new(client.clone(), "cpu")
            .concurrency(2)
            .run_until(cpu_model, stop.clone()),
    );

    for text in ["short prompt", "a prompt far too long for the GPU"] {
        let ticket = client
            .submit("gpu", &serde_json::json!({ "text": text }))
            .max_attempts(2)
            .fallback_queue("cpu")
            .send()
            .await?;
        let first = client
            .wait(ticket.id(), Some(Duration::from_secs(30)))
            .await?;
        // Follow the fallback chain to the request that answered.
        let last = match first.fallback_request_id {
            Some(next) => client.wait(&next, Some(Duration::from_secs(30))).await?,
            None => first,
        };
        let out: Completion = client.result(&last.id).await?;
        println!("{text:?} → {out:?}");
    }

    stop.cancel();
    gpu.await.expect("gpu worker")?;
    cpu.await.expect("cpu worker")?;
    Ok(())
}
