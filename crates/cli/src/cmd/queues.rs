//! `coatcheck queues`: counts by status, oldest queued age and claim rate.

use clap::Args as ClapArgs;
use coatcheck_core::Status;

use super::Conn;
use crate::exit;

/// `coatcheck queues` flags.
#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub conn: Conn,
}

/// Runs the subcommand.
pub async fn run(a: Args) -> anyhow::Result<i32> {
    let client = a.conn.client()?;
    let q = client.queues().await?;
    if a.conn.json {
        println!("{}", serde_json::to_string_pretty(&q)?);
        return Ok(exit::OK);
    }
    if q.queues.is_empty() {
        println!("no queues yet");
        return Ok(exit::OK);
    }
    print!("{:<24}", "QUEUE");
    for s in Status::ALL {
        print!(" {:>9}", s.as_str().to_uppercase());
    }
    println!(" {:>12} {:>9}", "OLDEST", "CLAIMS/S");
    for info in q.queues {
        print!("{:<24}", info.name);
        for s in Status::ALL {
            print!(" {:>9}", info.counts.get(&s).copied().unwrap_or(0));
        }
        let oldest = info
            .oldest_queued_age
            .map(|a| format!("{a:.1}s"))
            .unwrap_or_else(|| "-".into());
        println!(" {:>12} {:>9.2}", oldest, info.claim_rate);
    }
    Ok(exit::OK)
}
