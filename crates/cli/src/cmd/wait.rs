//! `coatcheck wait ID`: long-polls until the request is finished, prints
//! its output (or error) and exits with a code that tells the outcome.

use clap::Args as ClapArgs;

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
    match client.wait(&a.id, timeout).await {
        Ok(req) => {
            output::outcome(&req, a.conn.json);
            Ok(exit::for_status(req.status))
        }
        Err(coatcheck_client::Error::Timeout) => {
            eprintln!("timed out waiting for {}", a.id);
            Ok(exit::TIMED_OUT)
        }
        Err(e) => Err(e.into()),
    }
}
