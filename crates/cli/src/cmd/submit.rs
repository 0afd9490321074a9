//! `coatcheck submit QUEUE [INPUT]`: input from the argument, `--file`, or
//! standard input; prints the id (or, with `--wait`, the output).

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use serde_json::value::RawValue;

use super::Conn;
use crate::{exit, output};

/// `coatcheck submit` flags.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The queue.
    pub queue: String,
    /// The input JSON; `-` or absent reads standard input (unless --file).
    pub input: Option<String>,
    /// Read the input JSON from this file.
    #[arg(long, conflicts_with = "input")]
    pub file: Option<PathBuf>,
    /// The client's correlation id.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Higher runs first.
    #[arg(long, allow_hyphen_values = true)]
    pub priority: Option<i32>,
    /// Seconds before it may be claimed.
    #[arg(long)]
    pub delay: Option<f64>,
    /// Seconds until it expires if not finished.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Attempts before it is dead-lettered.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Metadata as key=value (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// On dead-letter, resubmit the same input to this queue.
    #[arg(long)]
    pub fallback_queue: Option<String>,
    /// An explicit Idempotency-Key (one is generated otherwise).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Wait for the outcome and print the output; the exit code tells it.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (exit 5).
    #[arg(long, requires = "wait")]
    pub wait_timeout: Option<f64>,
    #[command(flatten)]
    pub conn: Conn,
}

fn read_input(a: &Args) -> anyhow::Result<Box<RawValue>> {
    let text = match (&a.input, &a.file) {
        (Some(s), _) if s != "-" => s.clone(),
        (_, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        }
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read standard input")?;
            s
        }
    };
    let text = text.trim().to_string();
    if text.is_empty() {
        bail!("the input is empty; give JSON as an argument, with --file, or on standard input");
    }
    RawValue::from_string(text).context("the input is not valid JSON")
}

fn secs(field: &str, v: f64) -> anyhow::Result<Duration> {
    coatcheck_core::validate::duration(field, v).map_err(|e| anyhow::anyhow!("--{e}"))
}

/// Runs the subcommand.
pub async fn run(a: Args) -> anyhow::Result<i32> {
    let input = read_input(&a)?;
    let client = a.conn.client()?;
    let mut b = client.submit(&a.queue, &input);
    if let Some(c) = &a.correlation_id {
        b = b.correlation_id(c.clone());
    }
    if let Some(p) = a.priority {
        b = b.priority(p);
    }
    if let Some(d) = a.delay {
        b = b.delay(secs("delay", d)?);
    }
    if let Some(t) = a.timeout {
        b = b.timeout(secs("timeout", t)?);
    }
    if let Some(m) = a.max_attempts {
        b = b.max_attempts(m);
    }
    for kv in &a.metadata {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--metadata {kv:?} is not KEY=VALUE"))?;
        b = b.metadata(k, v);
    }
    if let Some(f) = &a.fallback_queue {
        b = b.fallback_queue(f.clone());
    }
    if let Some(k) = &a.idempotency_key {
        b = b.idempotency_key(k.clone());
    }
    let submitted = b.send().await?;
    if !a.wait {
        if a.conn.json {
            output::request(&submitted.request, true);
        } else {
            println!("{}", submitted.id());
        }
        return Ok(exit::OK);
    }
    let timeout = a
        .wait_timeout
        .map(|t| secs("wait-timeout", t))
        .transpose()?;
    let req = match client.wait(submitted.id(), timeout).await {
        Ok(r) => r,
        Err(coatcheck_client::Error::Timeout) => {
            eprintln!("timed out waiting for {}", submitted.id());
            return Ok(exit::TIMED_OUT);
        }
        Err(e) => return Err(e.into()),
    };
    output::outcome(&req, a.conn.json);
    Ok(exit::for_status(req.status))
}
