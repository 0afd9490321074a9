//! One file per subcommand.

pub mod bench;
pub mod cancel;
pub mod channel;
pub mod keys;
pub mod queues;
pub mod serve;
pub mod status;
pub mod submit;
pub mod wait;
pub mod worker;

use std::future::Future;

use clap::Args as ClapArgs;
use coatcheck_client::Client;

use crate::exit;

/// Options every client subcommand shares.
#[derive(Debug, Clone, ClapArgs)]
pub struct Conn {
    /// The server's base URL.
    #[arg(
        long = "server",
        env = "COATCHECK_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// An API key (sent as `Authorization: Bearer`).
    #[arg(long = "api-key", env = "COATCHECK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print JSON for scripts instead of human output.
    #[arg(long)]
    pub json: bool,
}

impl Conn {
    /// A client for the server.
    pub fn client(&self) -> anyhow::Result<Client> {
        let mut b = Client::builder(self.server.clone());
        if let Some(k) = &self.api_key {
            b = b.api_key(k.clone());
        }
        Ok(b.build()?)
    }
}

/// Runs a client subcommand on a small runtime; errors become one line on
/// stderr and exit code 10.
pub fn client_main<F, Fut>(f: F) -> i32
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<i32>>,
{
    block_on(tokio::runtime::Builder::new_current_thread(), f)
}

fn block_on<F, Fut>(mut builder: tokio::runtime::Builder, f: F) -> i32
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<i32>>,
{
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return exit::ERROR;
        }
    };
    match rt.block_on(f()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            exit::ERROR
        }
    }
}

/// An error and its causes on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    s.replace('\n', " ")
}
