//! `coatcheck`: the server, the worker runner and the command-line client in
//! one binary. `main` stays thin: parse once, run one subcommand, turn its
//! outcome into one line and an exit code.

mod cmd;
mod exit;
mod output;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// coatcheck — Asynchronous Request-Reply: hand a request in, get a ticket,
/// get the reply when it is ready.
#[derive(Debug, Parser)]
#[command(name = "coatcheck", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(cmd::serve::Args),
    /// Submit a request; prints its id (or, with --wait, its output).
    Submit(cmd::submit::Args),
    /// Show a request.
    Status(cmd::status::Args),
    /// Wait for a request to finish; the exit code tells the outcome.
    Wait(cmd::wait::Args),
    /// Cancel a request.
    Cancel(cmd::cancel::Args),
    /// Show the queues: counts by status, oldest queued age, claim rate.
    Queues(cmd::queues::Args),
    /// Run a program as a worker: each request's input on its stdin, its
    /// stdout as the output (`coatcheck worker --queue Q -- CMD ARGS…`).
    Worker(cmd::worker::Args),
    /// Tail a reply channel: print each reply message, ack it once printed.
    Channel(cmd::channel::Args),
    /// Make API keys for the keys file.
    Keys(cmd::keys::Args),
    /// Measure the echo request-reply workload (server, worker and client
    /// in separate processes, as the peers were measured).
    Bench(cmd::bench::Args),
    /// The benchmark's echo worker process (started by `bench`).
    #[command(hide = true)]
    BenchWorker(cmd::bench::WorkerArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Command::Serve(a) => cmd::serve::main(a),
        Command::Submit(a) => cmd::client_main(|| cmd::submit::run(a)),
        Command::Status(a) => cmd::client_main(|| cmd::status::run(a)),
        Command::Wait(a) => cmd::client_main(|| cmd::wait::run(a)),
        Command::Cancel(a) => cmd::client_main(|| cmd::cancel::run(a)),
        Command::Queues(a) => cmd::client_main(|| cmd::queues::run(a)),
        Command::Worker(a) => cmd::worker::main(a),
        Command::Channel(a) => cmd::client_main(|| cmd::channel::run(a)),
        Command::Keys(a) => cmd::keys::main(a),
        // The bench client and its echo worker each run on one thread, as
        // the peers' Node.js and Python processes do: on 2 cores, handing
        // every response between runtime threads cost ~20% of their CPU.
        Command::Bench(a) => cmd::client_main(|| cmd::bench::run(a)),
        Command::BenchWorker(a) => cmd::client_main(|| cmd::bench::worker(a)),
    };
    std::process::exit(code);
}
