//! `coatcheck worker --queue Q [--concurrency N] -- CMD ARGS…`: any program
//! becomes a worker. Each claimed request runs `CMD ARGS…` once:
//!
//! - **Input**: the request's input JSON on the program's standard input
//!   (followed by a newline, then end of file). The environment also has
//!   `COATCHECK_REQUEST_ID`, `COATCHECK_QUEUE`, `COATCHECK_ATTEMPT`,
//!   `COATCHECK_MAX_ATTEMPTS`, `COATCHECK_CORRELATION_ID` (if any) and
//!   `COATCHECK_PROGRESS_FD`.
//! - **Output**: on exit status 0, standard output is the output: as JSON if
//!   it parses as JSON, otherwise as a JSON string of the text (without its
//!   trailing newline); empty output is `null`.
//! - **Failure**: a non-zero exit fails the attempt with the tail of standard
//!   error as the message (code `exit_status`, details `{"exit_code": N}`).
//!   Exit 75 (`EX_TEMPFAIL`) is retryable (the request is retried while
//!   attempts are left); any other code is not, unless `--retry-on-any-exit`.
//!   A program killed by a signal it was not sent by us fails the same way
//!   (`details: {"signal": N}`).
//! - **Progress**: a line on standard error that starts with
//!   `coatcheck:progress ` reports the rest of the line as progress (JSON,
//!   or a JSON string when it does not parse), and so does every line written
//!   to the file descriptor named by `COATCHECK_PROGRESS_FD` (e.g.
//!   `echo '{"pct": 50}' > /dev/fd/$COATCHECK_PROGRESS_FD`). Other standard
//!   error lines go to the worker's standard error, prefixed by the request id.
//! - **Cancel**: when the client cancels (or the lease is lost), the
//!   program's whole process group gets SIGTERM, then SIGKILL after
//!   `--kill-grace` seconds; the attempt ends `cancelled`.
//! - **Leases** are renewed by heartbeats for exactly as long as the program
//!   runs; its exit ends them.
//! - **Shutdown** (SIGTERM or SIGINT): stop claiming, let running programs
//!   finish within `--grace` seconds, then kill what is left (process group,
//!   SIGKILL) and hand those requests back to the queue; exit 0. A second
//!   signal kills every program at once and exits 10 (their leases run out
//!   on the server and the requests are retried).
//!
//! Each program runs in a process group of its own, so a cancel reaches
//! whatever it started too. Processes it leaves running in the background
//! after it exits are not waited for.
//!
//! If the worker itself dies without a word (SIGKILL, the OOM killer), each
//! program it started gets SIGKILL from the kernel (Linux's parent-death
//! signal), so no orphan keeps working on a request whose lease will run out
//! and be retried elsewhere. Only the program itself is reached that way,
//! not what it started in turn: a program that starts others should `exec`
//! its last command, or run under a supervisor that kills its whole group
//! (systemd's `KillMode=control-group`, a container).

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args as ClapArgs;
use coatcheck_client::{Client, HandlerError, Job, ProgressHandle, Worker, WorkerEvent};
use rustix::process::{kill_process_group, Pid, Signal};
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::one_line;
use crate::exit;

/// The exit status that means "try again later" (sysexits.h `EX_TEMPFAIL`).
pub const EX_TEMPFAIL: i32 = 75;

/// The prefix of a progress line on standard error.
pub const PROGRESS_PREFIX: &str = "coatcheck:progress ";

/// How much of standard error becomes the error message.
const STDERR_TAIL: usize = 4096;

/// The most standard output kept as the output (the server refuses more
/// than its body limit anyway, 1 MiB by default).
const MAX_STDOUT: usize = 64 * 1024 * 1024;

/// After the program exits, how long to wait for its pipes to close
/// (a background process it left may hold them open).
const DRAIN: Duration = Duration::from_secs(2);

/// `coatcheck worker` flags.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The queue to take requests from.
    #[arg(long, short = 'q')]
    pub queue: String,
    /// How many programs run at once.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub concurrency: usize,
    /// The lease in seconds; heartbeats renew it while the program runs.
    #[arg(long, default_value_t = 30.0)]
    pub lease: f64,
    /// Retry on any non-zero exit, not only 75 (EX_TEMPFAIL).
    #[arg(long)]
    pub retry_on_any_exit: bool,
    /// Seconds a shutdown lets running programs finish.
    #[arg(long, default_value_t = 30.0)]
    pub grace: f64,
    /// Seconds between SIGTERM and SIGKILL when a request is cancelled.
    #[arg(long, default_value_t = 10.0)]
    pub kill_grace: f64,
    /// The worker id in the requests' history (default: host, pid, random).
    #[arg(long)]
    pub worker_id: Option<String>,
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
    /// The program and its arguments (after `--`).
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Runs the subcommand on its own multi-threaded runtime.
pub fn main(a: Args) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return exit::ERROR;
        }
    };
    match rt.block_on(run(a)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            exit::ERROR
        }
    }
}

fn seconds(flag: &str, v: f64) -> anyhow::Result<Duration> {
    coatcheck_core::validate::duration(flag, v).map_err(|e| anyhow::anyhow!("--{e}"))
}

/// What every run of the program shares.
struct Runner {
    program: PathBuf,
    args: Vec<OsString>,
    retry_on_any_exit: bool,
    kill_grace: Duration,
    /// Process groups of the programs running now.
    groups: Mutex<HashSet<i32>>,
}

async fn run(a: Args) -> anyhow::Result<i32> {
    let lease = seconds("lease", a.lease)?;
    if lease.is_zero() {
        anyhow::bail!("--lease must be more than 0 seconds");
    }
    let grace = seconds("grace", a.grace)?;
    let kill_grace = seconds("kill-grace", a.kill_grace)?;
    let (program, args) = a.command.split_first().context("no command given")?;
    let program = resolve(Path::new(program))?;
    let mut b = Client::builder(a.server.clone());
    if let Some(k) = &a.api_key {
        b = b.api_key(k.clone());
    }
    let client = b.build()?;
    let runner = Arc::new(Runner {
        program,
        args: args.to_vec(),
        retry_on_any_exit: a.retry_on_any_exit,
        kill_grace,
        groups: Mutex::new(HashSet::new()),
    });

    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone(), runner.clone())?;

    let mut worker = Worker::new(client, a.queue.clone())
        .concurrency(a.concurrency.max(1))
        .lease(lease)
        .grace_period(grace)
        .on_event(report);
    if let Some(id) = &a.worker_id {
        worker = worker.worker_id(id.clone());
    }
    eprintln!(
        "coatcheck worker ready: queue {}, concurrency {}, running {}",
        a.queue,
        a.concurrency.max(1),
        runner.program.display()
    );
    let handler = {
        let runner = runner.clone();
        move |job: Job<Box<RawValue>>| {
            let runner = runner.clone();
            async move { runner.run_one(job).await }
        }
    };
    worker.run_until(handler, shutdown).await?;
    eprintln!("coatcheck worker: stopped");
    Ok(exit::OK)
}

/// SIGTERM/SIGINT: graceful shutdown; a second one: kill everything, exit.
fn watch_signals(shutdown: CancellationToken, runner: Arc<Runner>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                eprintln!("coatcheck worker: shutting down (finishing running requests; signal again to stop now)");
                shutdown.cancel();
            } else {
                let groups: Vec<i32> = runner
                    .groups
                    .lock()
                    .map(|g| g.iter().copied().collect())
                    .unwrap_or_default();
                eprintln!(
                    "coatcheck worker: stopping now, killing {} program(s)",
                    groups.len()
                );
                for g in groups {
                    signal_group(g, Signal::KILL);
                }
                std::process::exit(exit::ERROR);
            }
        }
    });
    Ok(())
}

/// One line on standard error per thing worth knowing.
fn report(e: &WorkerEvent) {
    match e {
        WorkerEvent::Settled { id, status } => match status {
            Some(s) => eprintln!("coatcheck worker: {id} {s}"),
            None => eprintln!("coatcheck worker: {id} settled"),
        },
        WorkerEvent::ClaimFailed { error, retry_in } => {
            eprintln!("coatcheck worker: claim failed ({error}); retrying in {retry_in:?}")
        }
        WorkerEvent::HeartbeatFailed { id, error } => {
            eprintln!("coatcheck worker: {id} heartbeat failed ({error}); retrying")
        }
        WorkerEvent::LeaseLost { id } => {
            eprintln!("coatcheck worker: {id} lease lost; stopping its program")
        }
        WorkerEvent::SettleFailed { ids, error } => {
            eprintln!(
                "coatcheck worker: reporting {} outcome(s) failed ({error}); retrying",
                ids.len()
            )
        }
        WorkerEvent::Rejected { id, error } => {
            eprintln!("coatcheck worker: {id} outcome refused: {error}")
        }
        WorkerEvent::GaveUp { id, error } => {
            eprintln!("coatcheck worker: {id} outcome not delivered: {error}")
        }
        WorkerEvent::Panicked { id, message } => {
            eprintln!("coatcheck worker: {id} panicked: {message}")
        }
        WorkerEvent::Abandoned { id } => {
            eprintln!("coatcheck worker: {id} still running at the end of the grace period; killed")
        }
        other => eprintln!("coatcheck worker: {other:?}"),
    }
}

/// The program as a path to run: as given when it has a `/`, else found on `PATH`.
fn resolve(program: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.as_os_str().is_empty() {
        anyhow::bail!("the command is empty");
    }
    if program.components().count() > 1 || program.to_string_lossy().contains('/') {
        if executable(program) {
            return Ok(program.to_path_buf());
        }
        anyhow::bail!("{} is not an executable file", program.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if executable(&candidate) {
            return Ok(candidate);
        }
    }
    anyhow::bail!("{} not found on PATH", program.display())
}

fn signal_group(pgid: i32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pgid) {
        let _ = kill_process_group(pid, sig);
    }
}

/// Asks the kernel to SIGKILL the program when the thread that spawns it
/// ends (Linux's parent-death signal). That thread is a runtime worker
/// thread (`run_one` is never run on the blocking pool), which lives as long
/// as the worker process: so the program dies with the worker, however the
/// worker dies. A worker that died between the fork and this call is seen
/// as a changed parent, and the program does not start.
#[allow(unsafe_code)]
fn die_with_this_thread(cmd: &mut tokio::process::Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec. It only
    // makes two system calls and builds errors from plain numbers: no
    // allocation, no lock, as a child of a multi-threaded process requires.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            if rustix::process::getppid() != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

/// Serializes spawns: while one child is being spawned, its progress pipe
/// is inheritable, and no other child may inherit it.
static SPAWN: Mutex<()> = Mutex::new(());

/// Kills the process group if the run is dropped before its program was
/// reaped (the grace period of a shutdown ended, or the worker stops).
struct GroupGuard<'a> {
    runner: &'a Runner,
    pgid: i32,
    armed: bool,
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::KILL);
        }
        if let Ok(mut g) = self.runner.groups.lock() {
            g.remove(&self.pgid);
        }
    }
}

/// How one run of the program ended.
enum Ended {
    Exited(std::process::ExitStatus),
    Cancelled,
}

impl Runner {
    async fn run_one(&self, job: Job<Box<RawValue>>) -> Result<Box<RawValue>, HandlerError> {
        let id = job.id().to_string();
        let (progress_rd, progress_wr) = std::io::pipe()
            .map_err(|e| HandlerError::retryable(format!("cannot make a pipe: {e}")))?;
        // The write end must survive exec in the child: clear close-on-exec.
        rustix::io::fcntl_setfd(&progress_wr, rustix::io::FdFlags::empty())
            .map_err(|e| HandlerError::retryable(format!("cannot share the progress pipe: {e}")))?;

        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .env("COATCHECK_REQUEST_ID", &id)
            .env("COATCHECK_QUEUE", job.queue())
            .env("COATCHECK_ATTEMPT", job.attempt().to_string())
            .env("COATCHECK_MAX_ATTEMPTS", job.max_attempts().to_string())
            .env("COATCHECK_PROGRESS_FD", progress_wr.as_raw_fd().to_string());
        match job.correlation_id() {
            Some(c) => cmd.env("COATCHECK_CORRELATION_ID", c),
            None => cmd.env_remove("COATCHECK_CORRELATION_ID"),
        };
        die_with_this_thread(&mut cmd);
        let spawned = {
            let _one_at_a_time = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
            let spawned = cmd.spawn();
            drop(progress_wr);
            spawned
        };
        let mut child = spawned.map_err(|e| {
            HandlerError::retryable(format!("cannot start {}: {e}", self.program.display()))
                .code("spawn_failed")
        })?;
        let Some(pgid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            return Err(HandlerError::retryable(
                "the program exited before it started",
            ));
        };
        if let Ok(mut g) = self.groups.lock() {
            g.insert(pgid);
        }
        let mut guard = GroupGuard {
            runner: self,
            pgid,
            armed: true,
        };

        // Input, output, error and progress, all at once (no pipe can fill
        // up and stall the program).
        let mut stdin = child.stdin.take().expect("piped");
        let input = job.input.get().as_bytes().to_vec();
        let feed = tokio::spawn(async move {
            // A program that does not read its input is fine.
            let _ = stdin.write_all(&input).await;
            let _ = stdin.write_all(b"\n").await;
            let _ = stdin.shutdown().await;
        });
        let stdout = child.stdout.take().expect("piped");
        let out = tokio::spawn(read_capped(stdout));
        let stderr = child.stderr.take().expect("piped");
        let err = tokio::spawn(read_stderr(stderr, job.progress_handle(), id.clone()));
        let progress = tokio::spawn(read_progress_fd(progress_rd.into(), job.progress_handle()));

        let cancelled = job.cancelled();
        let ended = tokio::select! {
            status = child.wait() => match status {
                Ok(s) => Ended::Exited(s),
                Err(e) => {
                    return Err(HandlerError::retryable(format!("cannot wait for the program: {e}")));
                }
            },
            _ = cancelled.cancelled() => {
                self.terminate(&mut child, pgid).await;
                Ended::Cancelled
            }
        };
        // Reaped (or killed and reaped): nothing left to kill by this group id.
        guard.armed = false;
        feed.abort();
        let stdout = drain(out).await.unwrap_or_default();
        let tail = drain(err).await.unwrap_or_default();
        if tokio::time::timeout(DRAIN, progress).await.is_err() {
            // A background process holds the progress pipe: stop reading it.
        }
        drop(guard);

        match ended {
            Ended::Cancelled => {
                Err(HandlerError::retryable("cancelled: the program was stopped").code("cancelled"))
            }
            Ended::Exited(status) => self.outcome(status, stdout, tail),
        }
    }

    /// SIGTERM to the group, SIGKILL after the kill grace; reaps the program.
    async fn terminate(&self, child: &mut tokio::process::Child, pgid: i32) {
        signal_group(pgid, Signal::TERM);
        if tokio::time::timeout(self.kill_grace, child.wait())
            .await
            .is_err()
        {
            signal_group(pgid, Signal::KILL);
            let _ = child.wait().await;
        } else {
            // The program is gone; anything it started in its group goes too.
            signal_group(pgid, Signal::KILL);
        }
    }

    fn outcome(
        &self,
        status: std::process::ExitStatus,
        stdout: Captured,
        tail: String,
    ) -> Result<Box<RawValue>, HandlerError> {
        use std::os::unix::process::ExitStatusExt;
        if status.success() {
            if stdout.truncated {
                return Err(HandlerError::fatal(format!(
                    "the program wrote more than {MAX_STDOUT} bytes to standard output"
                ))
                .code("invalid_output"));
            }
            return output_of(&stdout.bytes);
        }
        let tail = tail.trim();
        match (status.code(), status.signal()) {
            (Some(code), _) => {
                let message = if tail.is_empty() {
                    format!("the program exited with status {code}")
                } else {
                    tail.to_string()
                };
                let e = if code == EX_TEMPFAIL || self.retry_on_any_exit {
                    HandlerError::retryable(message)
                } else {
                    HandlerError::fatal(message)
                };
                Err(e
                    .code("exit_status")
                    .details(serde_json::json!({ "exit_code": code })))
            }
            (None, sig) => {
                let sig = sig.unwrap_or(0);
                let message = if tail.is_empty() {
                    format!("the program was killed by signal {sig}")
                } else {
                    tail.to_string()
                };
                let e = if self.retry_on_any_exit {
                    HandlerError::retryable(message)
                } else {
                    HandlerError::fatal(message)
                };
                Err(e
                    .code("exit_status")
                    .details(serde_json::json!({ "signal": sig })))
            }
        }
    }
}

/// The output for what the program wrote: JSON as is, text as a JSON
/// string without its trailing newline, nothing as `null`.
fn output_of(bytes: &[u8]) -> Result<Box<RawValue>, HandlerError> {
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() {
        return Ok(RawValue::from_string("null".into()).expect("null is JSON"));
    }
    if let Ok(raw) = serde_json::from_slice::<&RawValue>(trimmed) {
        return Ok(raw.to_owned());
    }
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(HandlerError::fatal(
            "the program's standard output is neither JSON nor UTF-8 text",
        )
        .code("invalid_output"));
    };
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    serde_json::value::to_raw_value(text)
        .map_err(|e| HandlerError::fatal(format!("cannot encode the output: {e}")))
}

/// Progress as JSON, or the text as a JSON string.
fn progress_value(text: &str) -> serde_json::Value {
    let text = text.trim();
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_string()))
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

async fn read_capped(mut r: tokio::process::ChildStdout) -> Captured {
    let mut c = Captured::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return c,
            Ok(n) => {
                if c.bytes.len() + n > MAX_STDOUT {
                    c.truncated = true;
                } else {
                    c.bytes.extend_from_slice(&buf[..n]);
                }
            }
        }
    }
}

/// Reads standard error: progress lines are reported, the others are
/// echoed and their tail kept for the error message.
async fn read_stderr(
    r: tokio::process::ChildStderr,
    progress: ProgressHandle,
    id: String,
) -> String {
    let mut lines = BufReader::new(r);
    let mut tail = String::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return keep_tail(&tail, STDERR_TAIL),
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if let Some(p) = text.strip_prefix(PROGRESS_PREFIX) {
            progress.report(progress_value(p));
            continue;
        }
        eprintln!("[{id}] {text}");
        tail.push_str(text);
        tail.push('\n');
        if tail.len() > 2 * STDERR_TAIL {
            tail = keep_tail(&tail, STDERR_TAIL);
        }
    }
}

/// The last `max` bytes of `s`, cut at a character boundary.
fn keep_tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

/// Reads progress lines from the pipe whose write end the program has.
async fn read_progress_fd(fd: OwnedFd, progress: ProgressHandle) {
    let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut lines = BufReader::new(rx).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if !line.trim().is_empty() {
            progress.report(progress_value(&line));
        }
    }
}

/// A reader task's result, or nothing if the pipe stays open too long.
async fn drain<T>(task: tokio::task::JoinHandle<T>) -> Option<T> {
    let abort = task.abort_handle();
    match tokio::time::timeout(DRAIN, task).await {
        Ok(Ok(v)) => Some(v),
        _ => {
            abort.abort();
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs() {
        assert_eq!(output_of(b"").unwrap().get(), "null");
        assert_eq!(output_of(b" \n").unwrap().get(), "null");
        assert_eq!(output_of(b"{\"a\": 1}\n").unwrap().get(), "{\"a\": 1}");
        assert_eq!(output_of(b"42\n").unwrap().get(), "42");
        assert_eq!(output_of(b"hello\n").unwrap().get(), "\"hello\"");
        assert_eq!(
            output_of(b"two\nlines\r\n").unwrap().get(),
            "\"two\\nlines\""
        );
        assert_eq!(output_of(b"{\"a\": \n").unwrap().get(), "\"{\\\"a\\\": \"");
        let e = output_of(b"\xff\xfe").unwrap_err();
        assert!(!e.is_retryable());
    }

    #[test]
    fn progress_lines_and_tails() {
        assert_eq!(
            progress_value(" {\"pct\": 5} "),
            serde_json::json!({"pct": 5})
        );
        assert_eq!(progress_value("half way"), serde_json::json!("half way"));
        assert_eq!(keep_tail("abcdef", 3), "def");
        assert_eq!(keep_tail("ab€", 2), "");
        assert_eq!(keep_tail("ab€", 3), "€");
        assert_eq!(keep_tail("ab", 3), "ab");
    }
}
