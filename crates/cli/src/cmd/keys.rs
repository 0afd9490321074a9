//! `coatcheck keys new`: makes an API key and prints it with the keys-file
//! entry that holds only its hash.

use clap::{Args as ClapArgs, Subcommand, ValueEnum};

use crate::exit;

/// `coatcheck keys` subcommands.
#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: KeysCommand,
}

/// What to do with keys.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new random key; prints it and a keys-file entry with its hash.
    New(NewArgs),
    /// Print the hash of an existing key (read from standard input).
    Hash,
}

/// The role of a new key.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    /// Submits and reads its tenant's requests.
    Client,
    /// Claims and settles requests on its queues.
    Worker,
    /// Everything, across tenants.
    Admin,
}

/// `coatcheck keys new` flags.
#[derive(Debug, ClapArgs)]
pub struct NewArgs {
    /// The role.
    #[arg(long, value_enum, default_value_t = RoleArg::Client)]
    pub role: RoleArg,
    /// The tenant.
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// A name for logs.
    #[arg(long)]
    pub name: Option<String>,
    /// Restrict the key to these queues (repeatable).
    #[arg(long = "queue")]
    pub queues: Vec<String>,
}

/// Runs the subcommand.
pub fn main(a: Args) -> i32 {
    match a.cmd {
        KeysCommand::New(n) => {
            let key = coatcheck_server::keys::new_key();
            let role = format!("{:?}", n.role).to_lowercase();
            println!("key: {key}");
            println!();
            println!("# keys.toml entry (holds only the hash; give the key above to its user):");
            println!("[[key]]");
            if let Some(name) = &n.name {
                println!("name = {}", toml_str(name));
            }
            println!("hash = \"{}\"", coatcheck_server::keys::hash_key(&key));
            println!("role = \"{role}\"");
            println!("tenant = {}", toml_str(&n.tenant));
            if !n.queues.is_empty() {
                let qs: Vec<String> = n.queues.iter().map(|q| toml_str(q)).collect();
                println!("queues = [{}]", qs.join(", "));
            }
            exit::OK
        }
        KeysCommand::Hash => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err() || line.trim().is_empty() {
                eprintln!("error: give the key on standard input");
                return exit::ERROR;
            }
            println!("{}", coatcheck_server::keys::hash_key(line.trim()));
            exit::OK
        }
    }
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}
