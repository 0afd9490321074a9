//! `coatcheck cancel ID`: queued requests are cancelled at once; running
//! ones are asked to stop (the worker learns it on its next heartbeat).

use clap::Args as ClapArgs;
use coatcheck_client::CancelOutcome;

use super::Conn;
use crate::{exit, output};

/// `coatcheck cancel` flags.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The request id.
    pub id: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// Runs the subcommand.
pub async fn run(a: Args) -> anyhow::Result<i32> {
    let client = a.conn.client()?;
    match client.cancel(&a.id).await? {
        CancelOutcome::Cancelled(req) => {
            if a.conn.json {
                output::request(&req, true);
            } else {
                println!("cancelled {}", req.id);
            }
        }
        _ => {
            if a.conn.json {
                output::request(&client.get(&a.id).await?, true);
            } else {
                println!(
                    "cancel requested for {} (it is running; the worker will stop it)",
                    a.id
                );
            }
        }
    }
    Ok(exit::OK)
}
