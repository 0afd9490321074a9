//! `coatcheck channel NAME`: tails a reply channel, printing each reply
//! message as it arrives and acking it once printed (`--no-ack` leaves it
//! to be delivered again after its visibility timeout).
//!
//! Output: one line per message, `REQUEST_ID<TAB>STATUS<TAB>CORRELATION_ID
//! (or -)<TAB>OUTPUT (compact JSON) or [CODE] ERROR MESSAGE`; with `--json`,
//! the message as one line of JSON (with its `ack_token` and
//! `delivery_count`). A message is acked only after its line is written,
//! so a crash in between means it is printed again later (at-least-once).

use std::time::Duration;

use clap::Args as ClapArgs;
use coatcheck_client::wire::ChannelMessage;
use coatcheck_client::Delivery;
use futures::StreamExt;
use tokio::time::Instant;

use super::Conn;
use crate::exit;

/// `coatcheck channel` flags.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The channel name.
    pub name: String,
    /// Ack each message after printing it (the default).
    #[arg(long, overrides_with = "no_ack")]
    pub ack: bool,
    /// Do not ack: messages are delivered again after --visibility.
    #[arg(long, overrides_with = "ack")]
    pub no_ack: bool,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds (exit 5 if --count was not reached).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Seconds a received message stays hidden before it is delivered again
    /// unless acked.
    #[arg(long, default_value_t = 30.0)]
    pub visibility: f64,
    /// Messages per receive (1..100).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max: u32,
    #[command(flatten)]
    pub conn: Conn,
}

/// Runs the subcommand.
pub async fn run(a: Args) -> anyhow::Result<i32> {
    let client = a.conn.client()?;
    let visibility = coatcheck_core::validate::duration("visibility", a.visibility)
        .map_err(|e| anyhow::anyhow!("--{e}"))?;
    if visibility.is_zero() {
        anyhow::bail!("--visibility must be more than 0 seconds");
    }
    let deadline = a
        .timeout
        .map(|t| {
            coatcheck_core::validate::duration("timeout", t)
                .map(|d| Instant::now() + d)
                .map_err(|e| anyhow::anyhow!("--{e}"))
        })
        .transpose()?;
    let ack = !a.no_ack;
    let channel = client
        .channel(a.name.clone())
        .max(a.max)
        .visibility(visibility)
        .wait(Duration::from_secs(30));
    let mut messages = channel.messages();
    let mut printed = 0u64;
    while a.count.is_none_or(|c| printed < c) {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, messages.next()).await {
                Ok(n) => n,
                Err(_) => {
                    return Ok(if a.count.is_some() {
                        exit::TIMED_OUT
                    } else {
                        exit::OK
                    });
                }
            },
            None => messages.next().await,
        };
        let Some(delivery) = next else { break };
        let delivery = delivery?;
        if let Err(e) = print(&delivery, a.conn.json) {
            // Standard output is gone (e.g. piped into `head`): stop, and
            // leave this message unacked to be delivered again.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(exit::OK);
            }
            return Err(e.into());
        }
        printed += 1;
        if ack {
            if let Err(e) = delivery.ack().await {
                eprintln!(
                    "warning: could not ack {} (it will be delivered again): {e}",
                    delivery.message.message_id
                );
            }
        }
    }
    Ok(exit::OK)
}

/// Writes one line for `d` and flushes it, so it is out before the ack.
fn print(d: &Delivery, json: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let m = &d.message;
    if json {
        let whole = ChannelMessage {
            message: m.clone(),
            ack_token: d.ack_token.clone(),
            delivery_count: d.delivery_count,
        };
        writeln!(out, "{}", serde_json::to_string(&whole).unwrap_or_default())?;
        return out.flush();
    }
    let what = match (&m.output, &m.error) {
        (Some(o), _) => o.get().to_string(),
        (None, Some(e)) => match &e.code {
            Some(code) => format!("[{code}] {}", e.message),
            None => e.message.clone(),
        },
        (None, None) => "null".to_string(),
    };
    writeln!(
        out,
        "{}\t{}\t{}\t{}",
        m.request_id,
        m.status,
        m.correlation_id.as_deref().unwrap_or("-"),
        what.replace(['\n', '\t'], " ")
    )?;
    out.flush()
}
