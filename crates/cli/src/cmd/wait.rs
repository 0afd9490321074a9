//! `coatcheck wait ID`: follows the request until it is finished, prints
//! its output (or error) and exits with a code that tells the outcome.
//!
//! It follows the request's Server-Sent Events (`GET …/events`, resumed by
//! the SDK after a dropped connection), so it learns the outcome the moment
//! it happens; with `--progress` each progress report goes to standard
//! error as it arrives. If the stream cannot be used (a proxy that refuses
//! or breaks it, an older server), it falls back to long-polling
//! `GET /v1/requests/{id}?wait=N` for the rest of the time.

use std::time::Duration;

use clap::Args as ClapArgs;
use coatcheck_client::{Client, Error, Request, RequestEventKind};
use futures::StreamExt;
use tokio::time::Instant;

use super::Conn;
use crate::{exit, output};

/// `coatcheck wait` flags.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The request id.
    pub id: String,
    /// Give up after this many seconds (exit 5).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Print each progress report (JSON) to standard error as it arrives.
    #[arg(long)]
    pub progress: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// Runs the subcommand.
pub async fn run(a: Args) -> anyhow::Result<i32> {
    let client = a.conn.client()?;
    let timeout = a
        .timeout
        .map(|t| {
            coatcheck_core::validate::duration("timeout", t).map_err(|e| anyhow::anyhow!("--{e}"))
        })
        .transpose()?;
    let deadline = timeout.map(|t| Instant::now() + t);
    let followed = match deadline {
        Some(d) => tokio::time::timeout_at(d, follow(&client, &a.id, a.progress))
            .await
            .unwrap_or(Err(Error::Timeout)),
        None => follow(&client, &a.id, a.progress).await,
    };
    let result = match followed {
        Ok(Some(req)) => Ok(req),
        Ok(None) => {
            // The stream was of no use: long-poll for the time that is left.
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                Err(Error::Timeout)
            } else {
                client.wait(&a.id, left).await
            }
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(req) => {
            output::outcome(&req, a.conn.json);
            Ok(exit::for_status(req.status))
        }
        Err(Error::Timeout) => {
            eprintln!("timed out waiting for {}", a.id);
            Ok(exit::TIMED_OUT)
        }
        Err(e) => Err(e.into()),
    }
}

/// Follows the request's events to its terminal state; `Ok(None)` when the
/// stream failed or ended early, so the caller falls back to long-polling
/// (which reports a request that does not exist, or a refused key, itself).
async fn follow(client: &Client, id: &str, progress: bool) -> Result<Option<Request>, Error> {
    // A couple of quick reconnects, then long-polling takes over.
    let mut events = client.events(id).max_reconnects(2);
    let mut first = true;
    loop {
        let next = if first {
            // The server sends the current state at once; nothing within
            // this time means something in between holds the stream back.
            match tokio::time::timeout(FIRST_EVENT, events.next()).await {
                Ok(n) => n,
                Err(_) => return Ok(None),
            }
        } else {
            events.next().await
        };
        first = false;
        let Some(event) = next else {
            return Ok(None);
        };
        let Ok(event) = event else {
            return Ok(None);
        };
        if progress && event.kind == RequestEventKind::Progress {
            if let Some(p) = &event.request.progress {
                eprintln!("progress: {}", p.get());
            }
        }
        if event.is_terminal() {
            return Ok(Some(event.request));
        }
    }
}

/// How long the first event may take before `wait` falls back to long-polling.
const FIRST_EVENT: Duration = Duration::from_secs(10);
