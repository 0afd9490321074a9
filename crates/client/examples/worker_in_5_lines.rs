//! The README's "Write a worker in 5 lines", kept compiling here.
//!
//! ```sh
//! coatcheck serve &
//! cargo run -p coatcheck-client --example worker_in_5_lines &
//! coatcheck submit greetings '"world"' --wait     # prints "hello, world"
//! ```

use coatcheck_client::{Client, HandlerError, Job, Worker};

#[tokio::main]
async fn main() -> Result<(), coatcheck_client::Error> {
    let url = std::env::var("COATCHECK_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    Worker::new(Client::new(url)?, "greetings")
        .concurrency(8)
        .run(
            |job: Job<String>| async move { Ok::<_, HandlerError>(format!("hello, {}", job.input)) },
            tokio::signal::ctrl_c(),
        )
        .await
}
