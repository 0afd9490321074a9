//! `coatcheck status ID`: one request, human or `--json`.

use clap::Args as ClapArgs;

use super::Conn;
use crate::{exit, output};

/// `coatcheck status` flags.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The request id.
    pub id: String,
    /// Also print its history.
    #[arg(long)]
    pub history: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// Runs the subcommand.
pub async fn run(a: Args) -> anyhow::Result<i32> {
    let client = a.conn.client()?;
    let req = client.get(&a.id).await?;
    output::request(&req, a.conn.json);
    if a.history {
        let events = client.history(&a.id).await?;
        if a.conn.json {
            println!("{}", serde_json::to_string_pretty(&events)?);
        } else {
            println!("history:");
            for e in events {
                let detail = serde_json::to_value(&e.kind).unwrap_or_default();
                let mut detail = detail.as_object().cloned().unwrap_or_default();
                detail.remove("kind");
                let extra = if detail.is_empty() {
                    String::new()
                } else {
                    serde_json::Value::Object(detail).to_string()
                };
                println!(
                    "  {:>3} {} {:<22} {extra}",
                    e.seq,
                    e.at.to_rfc3339(),
                    e.kind.name()
                );
            }
        }
    }
    Ok(exit::OK)
}
