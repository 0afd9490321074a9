//! `coatcheck bench`: the echo request-reply workload the peers were
//! measured on, through the SDK over real HTTP, with server, worker and
//! client in separate processes.
//!
//! The workload (identical to the peers'): a ~100-byte JSON payload
//! `{"id": i, "client": "bench", "ts": <ms>, "body": 64×"x"}`; the worker
//! returns its input; the client checks each reply's id. 500 warm-up
//! requests; (a) throughput: N requests, at most `--window` outstanding,
//! one worker process with concurrency 16, first submit → last reply;
//! (b) latency: sequential requests, submit → reply, p50/p99/max. Also the
//! enqueue-only rate and the claim+complete-only rate.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args as ClapArgs, ValueEnum};
use coatcheck_client::{Client, HandlerError, Job, Worker};
use coatcheck_core::{ReplyTo, Status};
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::exit;

/// How the client learns each reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplyMode {
    /// `Prefer: wait` on the submit: one round trip per request.
    PreferWait,
    /// Submit, then long-poll `GET /v1/requests/{id}?wait=`.
    LongPoll,
    /// Submit with a reply channel; one consumer receives replies in batches.
    Channel,
}

/// `coatcheck bench` flags.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Requests in the throughput phase.
    #[arg(long, default_value_t = 20_000)]
    pub n: usize,
    /// At most this many outstanding requests from the client.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Sequential requests in the latency phase.
    #[arg(long, default_value_t = 2_000)]
    pub latency_n: usize,
    /// Warm-up requests (not measured).
    #[arg(long, default_value_t = 500)]
    pub warmup: usize,
    /// The worker process's concurrency.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// How the client gets replies.
    #[arg(long, value_enum, default_value_t = ReplyMode::PreferWait)]
    pub mode: ReplyMode,
    /// Benchmark a running server instead of starting one.
    #[arg(long, conflicts_with = "store")]
    pub url: Option<String>,
    /// Start the server on this store (postgres://…) instead of a fresh embedded one.
    #[arg(long)]
    pub store: Option<String>,
    /// Skip the enqueue-only and claim+complete-only phases.
    #[arg(long)]
    pub skip_phases: bool,
    /// First fill another queue with this many requests that nobody claims,
    /// so the measured phases run over a deep backlog in the same store.
    #[arg(long, default_value_t = 0)]
    pub backlog: usize,
    /// Also run this many more workers on the same queue, each with
    /// concurrency 1 (one process for all of them): mostly idle, each keeps a
    /// long-poll claim waiting, so the run shows what many idle workers cost
    /// (every submit should go to one of them, not wake them all). Not part
    /// of the peers' workload.
    #[arg(long, default_value_t = 0)]
    pub idle_workers: usize,
    /// Print one JSON document instead of a report.
    #[arg(long)]
    pub json: bool,
}

/// The hidden worker process of the benchmark.
#[derive(Debug, ClapArgs)]
pub struct WorkerArgs {
    /// The server.
    #[arg(long)]
    pub server: String,
    /// The queue.
    #[arg(long)]
    pub queue: String,
    /// Concurrency.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Workers in this process, each with `concurrency`.
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
}

#[derive(Debug, Serialize)]
struct Latency {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Enqueue → claim, from the server's own timestamps in each request's
/// history (`submitted` → `claimed`): how long a waiting worker takes to get
/// a new request, with nothing else queued.
#[derive(Debug, Serialize)]
struct Wake {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
}

/// Where a sequential round trip's time goes (p50 of each stage), from the
/// client's wall clock and the server's history timestamps: meaningful only
/// when both run on one machine (not with `--url` to another host).
#[derive(Debug, Serialize)]
struct Stages {
    n: usize,
    /// Client sends the submit → the server stamps it stored.
    sent_to_stored_p50_ms: f64,
    /// Stored → a worker's claim is stamped (the wake time).
    stored_to_claimed_p50_ms: f64,
    /// Claimed → the completion is stamped (the worker's side).
    claimed_to_completed_p50_ms: f64,
    /// Completion stamped → the reply reaches the client (fsync included).
    completed_to_received_p50_ms: f64,
}

/// Where the slowest sequential round trips' time goes: the mean of each
/// stage over the trips at or above the p99 of the whole round trip (what
/// the p99 is made of).
#[derive(Debug, Serialize)]
struct Tail {
    n: usize,
    sent_to_stored_ms: f64,
    stored_to_claimed_ms: f64,
    claimed_to_completed_ms: f64,
    completed_to_received_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    reply_mode: ReplyMode,
    store: String,
    backlog: usize,
    n: usize,
    window: usize,
    worker_concurrency: usize,
    idle_workers: usize,
    throughput_replies_per_s: f64,
    latency: Latency,
    wake: Option<Wake>,
    stages: Option<Stages>,
    /// The same stages for the slowest 1 % of the sequential round trips.
    stages_slowest: Option<Tail>,
    /// The same breakdown for a sample of the throughput phase.
    stages_under_load: Option<Stages>,
    enqueue_only_per_s: Option<f64>,
    claim_complete_only_per_s: Option<f64>,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the coatcheck executable")
}

fn start_server(store: Option<&str>, dir: &std::path::Path) -> anyhow::Result<(Proc, String)> {
    let mut cmd = Command::new(exe()?);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.join("data"));
    if let Some(s) = store {
        cmd.args(["--store", s]);
    }
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start coatcheck serve")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let proc = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the server's ready line")?;
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(str::to_string);
    match url {
        Some(u) => Ok((proc, u)),
        None => bail!("the server did not start (it said {line:?})"),
    }
}

fn start_worker(url: &str, queue: &str, concurrency: usize) -> anyhow::Result<Proc> {
    start_workers(url, queue, concurrency, 1)
}

/// One worker process running `instances` workers.
fn start_workers(
    url: &str,
    queue: &str,
    concurrency: usize,
    instances: usize,
) -> anyhow::Result<Proc> {
    let child = Command::new(exe()?)
        .args([
            "bench-worker",
            "--server",
            url,
            "--queue",
            queue,
            "--concurrency",
            &concurrency.to_string(),
            "--instances",
            &instances.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the bench worker")?;
    Ok(Proc(child))
}

fn payload(i: usize) -> Box<RawValue> {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let body = "x".repeat(64);
    RawValue::from_string(format!(
        r#"{{"id":{i},"client":"bench","ts":{ts},"body":"{body}"}}"#
    ))
    .expect("valid JSON")
}

fn reply_id(output: Option<&RawValue>) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Echo {
        id: u64,
    }
    serde_json::from_str::<Echo>(output?.get())
        .ok()
        .map(|e| e.id)
}

/// Progress on stderr when it is a terminal.
struct Progress {
    label: &'static str,
    total: usize,
    done: AtomicUsize,
    tty: bool,
}

impl Progress {
    fn new(label: &'static str, total: usize) -> Arc<Self> {
        Arc::new(Progress {
            label,
            total,
            done: AtomicUsize::new(0),
            tty: std::io::stderr().is_terminal(),
        })
    }

    fn tick(&self) {
        let d = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if self.tty && (d.is_multiple_of(500) || d == self.total) {
            let width = 30;
            let filled = d * width / self.total.max(1);
            eprint!(
                "\r{:<12} [{}{}] {d}/{}",
                self.label,
                "#".repeat(filled),
                " ".repeat(width - filled),
                self.total
            );
            if d == self.total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    }
}

/// One request through the whole loop; returns when its reply is in and checked.
async fn round_trip(
    client: &Client,
    queue: &str,
    mode: ReplyMode,
    i: usize,
    inbox: Option<&Inbox>,
) -> anyhow::Result<String> {
    let input = payload(i);
    match mode {
        ReplyMode::PreferWait => {
            let mut out = client
                .submit(queue, &input)
                .prefer_wait(Duration::from_secs(60))
                .send()
                .await?;
            if !out.request.status.is_terminal() {
                out.request = client
                    .wait(out.id(), Some(Duration::from_secs(120)))
                    .await?;
            }
            check(&out.request, i)?;
            Ok(out.request.id)
        }
        ReplyMode::LongPoll => {
            let out = client.submit(queue, &input).send().await?;
            let req = client
                .wait(out.id(), Some(Duration::from_secs(120)))
                .await?;
            check(&req, i)?;
            Ok(req.id)
        }
        ReplyMode::Channel => {
            let inbox = inbox.context("channel mode needs an inbox")?;
            let rx = inbox.expect(i);
            let out = client
                .submit(queue, &input)
                .reply_to(ReplyTo::Channel(inbox.channel.clone()))
                .send()
                .await?;
            let id = tokio::time::timeout(Duration::from_secs(120), rx)
                .await
                .context("no reply within 120 s")??;
            if id != i as u64 {
                bail!("reply {id} for request {i}");
            }
            Ok(out.request.id)
        }
    }
}

fn check(req: &coatcheck_core::Request, i: usize) -> anyhow::Result<()> {
    if req.status != Status::Succeeded {
        bail!("request {i} ended {}", req.status);
    }
    match reply_id(req.output.as_deref()) {
        Some(id) if id == i as u64 => Ok(()),
        other => bail!("reply {other:?} for request {i}"),
    }
}

/// The reply-channel consumer: receives in batches, acks in batches, and
/// hands each reply to the request waiting for it.
struct Inbox {
    channel: String,
    waiting:
        Arc<std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<u64>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Inbox {
    fn start(client: Client, channel: String) -> Inbox {
        let waiting: Arc<
            std::sync::Mutex<std::collections::HashMap<u64, tokio::sync::oneshot::Sender<u64>>>,
        > = Arc::default();
        let w = waiting.clone();
        let ch = channel.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok(msgs) = client
                    .channel_receive(&ch, 100, Duration::from_secs(30), Duration::from_secs(5))
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if msgs.is_empty() {
                    continue;
                }
                let tokens: Vec<String> = msgs.iter().map(|m| m.ack_token.clone()).collect();
                for m in msgs {
                    if let Some(id) = reply_id(m.message.output.as_deref()) {
                        if let Some(tx) = w.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                            let _ = tx.send(id);
                        }
                    }
                }
                let _ = client.channel_ack(&ch, tokens).await;
            }
        });
        Inbox {
            channel,
            waiting,
            task,
        }
    }

    fn expect(&self, i: usize) -> tokio::sync::oneshot::Receiver<u64> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(i as u64, tx);
        rx
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `n` requests with at most `window` outstanding; returns the elapsed time.
#[allow(clippy::too_many_arguments)]
async fn windowed(
    client: &Client,
    queue: &str,
    mode: ReplyMode,
    first: usize,
    n: usize,
    window: usize,
    inbox: Option<&Inbox>,
    progress: Option<Arc<Progress>>,
) -> anyhow::Result<(Duration, Vec<Trip>)> {
    // Every `every`-th round trip is timed for the stage breakdown.
    let every = (n / WAKE_SAMPLE).max(1);
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut trips = Vec::with_capacity(n / every + 1);
    let mut next = first;
    while next < first + n || !inflight.is_empty() {
        while next < first + n && inflight.len() < window {
            let i = next;
            inflight.push(async move {
                let sent = chrono::Utc::now();
                let id = round_trip(client, queue, mode, i, inbox).await?;
                let trip = (i - first).is_multiple_of(every).then(|| Trip {
                    id,
                    sent,
                    received: chrono::Utc::now(),
                });
                anyhow::Ok(trip)
            });
            next += 1;
        }
        if let Some(res) = inflight.next().await {
            trips.extend(res?);
            if let Some(p) = &progress {
                p.tick();
            }
        }
    }
    Ok((start.elapsed(), trips))
}

async fn enqueue_only(
    client: &Client,
    queue: &str,
    n: usize,
    window: usize,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut next = 0;
    while next < n || !inflight.is_empty() {
        while next < n && inflight.len() < window {
            let input = payload(next);
            inflight.push(async move { client.submit(queue, &input).send().await });
            next += 1;
        }
        if let Some(res) = inflight.next().await {
            res?;
        }
    }
    Ok(start.elapsed())
}

async fn drained(client: &Client, queue: &str, n: u64) -> anyhow::Result<()> {
    loop {
        let q = client.queues().await?;
        let done = q
            .queues
            .iter()
            .find(|i| i.name == queue)
            .and_then(|i| i.counts.get(&Status::Succeeded).copied())
            .unwrap_or(0);
        if done >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many of the throughput phase's round trips are timed stage by stage
/// (every sequential one is).
const WAKE_SAMPLE: usize = 500;

/// One sequential round trip as the client saw it: its id, and the wall
/// clock when the submit was sent and when the reply arrived.
struct Trip {
    id: String,
    sent: chrono::DateTime<chrono::Utc>,
    received: chrono::DateTime<chrono::Utc>,
}

/// Reads the sampled trips' histories: the wake time (submitted → claimed)
/// and where each round trip's time went, stage by stage (p50, and the
/// mean over the slowest 1 %).
async fn wake_times(
    client: &Client,
    trips: &[Trip],
) -> anyhow::Result<(Option<Wake>, Option<Stages>, Option<Tail>)> {
    use coatcheck_core::EventKind;
    let mut waits = Vec::with_capacity(trips.len());
    // Each finished trip: its whole span, then its four stages.
    let mut spans: Vec<(Duration, [Duration; 4])> = Vec::with_capacity(trips.len());
    for t in trips {
        let events = client.history(&t.id).await?;
        let at = |pick: fn(&EventKind) -> bool| events.iter().find(|e| pick(&e.kind)).map(|e| e.at);
        let submitted = at(|k| matches!(k, EventKind::Submitted { .. }));
        let claimed = at(|k| matches!(k, EventKind::Claimed { .. }));
        let succeeded = at(|k| matches!(k, EventKind::Succeeded { .. }));
        let span = |a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>| {
            (b - a).to_std().unwrap_or_default()
        };
        if let (Some(s), Some(c)) = (submitted, claimed) {
            waits.push(span(s, c));
            if let Some(d) = succeeded {
                let stages = [span(t.sent, s), span(s, c), span(c, d), span(d, t.received)];
                spans.push((span(t.sent, t.received), stages));
            }
        }
    }
    if waits.is_empty() {
        return Ok((None, None, None));
    }
    waits.sort();
    let wake = Wake {
        n: waits.len(),
        p50_ms: percentile(&waits, 0.50),
        p99_ms: percentile(&waits, 0.99),
    };
    if spans.is_empty() {
        return Ok((Some(wake), None, None));
    }
    let [a, b, c, d] = std::array::from_fn(|i| {
        let mut v: Vec<Duration> = spans.iter().map(|(_, st)| st[i]).collect();
        v.sort();
        percentile(&v, 0.50)
    });
    let stages = Stages {
        n: spans.len(),
        sent_to_stored_p50_ms: a,
        stored_to_claimed_p50_ms: b,
        claimed_to_completed_p50_ms: c,
        completed_to_received_p50_ms: d,
    };
    // The slowest 1 % (at least one trip), by the whole round trip.
    spans.sort_by_key(|(whole, _)| std::cmp::Reverse(*whole));
    let slowest = &spans[..spans.len().div_ceil(100)];
    let [a, b, c, d] = std::array::from_fn(|i| {
        let sum: Duration = slowest.iter().map(|(_, st)| st[i]).sum();
        sum.as_secs_f64() * 1000.0 / slowest.len() as f64
    });
    let tail = Tail {
        n: slowest.len(),
        sent_to_stored_ms: a,
        stored_to_claimed_ms: b,
        claimed_to_completed_ms: c,
        completed_to_received_ms: d,
    };
    Ok((Some(wake), Some(stages), Some(tail)))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx].as_secs_f64() * 1000.0
}

async fn bench(a: Args) -> anyhow::Result<Report> {
    if a.n == 0 || a.window == 0 || a.concurrency == 0 {
        bail!("--n, --window and --concurrency must be at least 1");
    }
    let dir = tempfile::tempdir().context("cannot create a temp dir")?;
    let (_server, url) = match &a.url {
        Some(u) => (None, u.clone()),
        None => {
            let (p, u) = start_server(a.store.as_deref(), dir.path())?;
            (Some(p), u)
        }
    };
    let store = match (&a.url, &a.store) {
        (Some(u), _) => format!("running server at {u}"),
        (None, Some(_)) => "PostgreSQL".into(),
        (None, None) => "embedded (fresh, fsync-durable)".into(),
    };
    let client = Client::builder(url.clone())
        .timeout(Duration::from_secs(120))
        .build()?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let run = &run[..8];

    if a.backlog > 0 {
        eprintln!("backlog: {} requests into a queue nobody claims", a.backlog);
        let took = enqueue_only(
            &client,
            &format!("bench-backlog-{run}"),
            a.backlog,
            a.window.max(256),
        )
        .await?;
        eprintln!(
            "backlog: stored in {:.1} s ({:.0}/s)",
            took.as_secs_f64(),
            a.backlog as f64 / took.as_secs_f64()
        );
    }
    let (mut enqueue_rate, mut drain_rate) = (None, None);
    if !a.skip_phases {
        let q = format!("bench-enqueue-{run}");
        eprintln!("enqueue-only: {} requests", a.n);
        let took = enqueue_only(&client, &q, a.n, a.window).await?;
        enqueue_rate = Some(a.n as f64 / took.as_secs_f64());
        eprintln!(
            "claim+complete-only: draining them with one worker (concurrency {})",
            a.concurrency
        );
        let start = Instant::now();
        let _w = start_worker(&url, &q, a.concurrency)?;
        drained(&client, &q, a.n as u64).await?;
        drain_rate = Some(a.n as f64 / start.elapsed().as_secs_f64());
    }

    let queue = format!("bench-echo-{run}");
    let _worker = start_worker(&url, &queue, a.concurrency)?;
    let _idle = if a.idle_workers > 0 {
        eprintln!("idle workers: {} more on the queue", a.idle_workers);
        Some(start_workers(&url, &queue, 1, a.idle_workers)?)
    } else {
        None
    };
    let inbox = (a.mode == ReplyMode::Channel)
        .then(|| Inbox::start(client.clone(), format!("bench-replies-{run}")));
    eprintln!("warm-up: {} requests", a.warmup);
    windowed(
        &client,
        &queue,
        a.mode,
        0,
        a.warmup,
        a.window,
        inbox.as_ref(),
        None,
    )
    .await?;
    eprintln!(
        "throughput: {} requests, window {}, reply mode {:?}",
        a.n, a.window, a.mode
    );
    let progress = Progress::new("throughput", a.n);
    let (took, loaded) = windowed(
        &client,
        &queue,
        a.mode,
        a.warmup,
        a.n,
        a.window,
        inbox.as_ref(),
        Some(progress),
    )
    .await?;
    let throughput = a.n as f64 / took.as_secs_f64();
    eprintln!("latency: {} sequential requests", a.latency_n);
    let progress = Progress::new("latency", a.latency_n);
    let mut lat = Vec::with_capacity(a.latency_n);
    let mut trips = Vec::with_capacity(a.latency_n);
    for k in 0..a.latency_n {
        let i = a.warmup + a.n + k;
        let (t, sent) = (Instant::now(), chrono::Utc::now());
        let id = round_trip(&client, &queue, a.mode, i, inbox.as_ref()).await?;
        lat.push(t.elapsed());
        let received = chrono::Utc::now();
        trips.push(Trip { id, sent, received });
        progress.tick();
    }
    lat.sort();
    let (wake, stages, stages_slowest) = wake_times(&client, &trips).await?;
    let (_, stages_under_load, _) = wake_times(&client, &loaded).await?;
    Ok(Report {
        reply_mode: a.mode,
        store,
        backlog: a.backlog,
        n: a.n,
        window: a.window,
        worker_concurrency: a.concurrency,
        idle_workers: a.idle_workers,
        throughput_replies_per_s: throughput,
        latency: Latency {
            n: lat.len(),
            p50_ms: percentile(&lat, 0.50),
            p99_ms: percentile(&lat, 0.99),
            max_ms: lat.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
        },
        wake,
        stages,
        stages_slowest,
        stages_under_load,
        enqueue_only_per_s: enqueue_rate,
        claim_complete_only_per_s: drain_rate,
    })
}

/// Runs the benchmark and prints its report.
pub async fn run(a: Args) -> anyhow::Result<i32> {
    let json = a.json;
    let r = bench(a).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(exit::OK);
    }
    println!("coatcheck bench — echo workload");
    println!("  store:              {}", r.store);
    println!(
        "  reply mode:         {}",
        serde_json::to_value(r.reply_mode)?.as_str().unwrap_or("")
    );
    println!(
        "  worker:             1 process, concurrency {}",
        r.worker_concurrency
    );
    if r.idle_workers > 0 {
        println!(
            "  idle workers:       {} more on the queue (1 process, concurrency 1 each)",
            r.idle_workers
        );
    }
    println!(
        "  throughput:         {:.0} replies/s  (n={}, window={})",
        r.throughput_replies_per_s, r.n, r.window
    );
    println!(
        "  latency:            p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={}, sequential)",
        r.latency.p50_ms, r.latency.p99_ms, r.latency.max_ms, r.latency.n
    );
    if let Some(w) = &r.wake {
        println!(
            "  enqueue→claim:      p50 {:.2} ms  p99 {:.2} ms  (server clock, from {} histories)",
            w.p50_ms, w.p99_ms, w.n
        );
    }
    if !r.store.starts_with("running server") {
        for (name, s) in [
            ("stages (p50):", &r.stages),
            ("under load (p50):", &r.stages_under_load),
        ] {
            if let Some(s) = s {
                println!(
                    "  {name:<20}sent→stored {:.2}  stored→claimed {:.2}  claimed→completed {:.2}  completed→received {:.2} ms",
                    s.sent_to_stored_p50_ms,
                    s.stored_to_claimed_p50_ms,
                    s.claimed_to_completed_p50_ms,
                    s.completed_to_received_p50_ms
                );
            }
        }
    }
    if let Some(t) = r
        .stages_slowest
        .as_ref()
        .filter(|_| !r.store.starts_with("running server"))
    {
        println!(
            "  slowest 1% (mean):  sent→stored {:.2}  stored→claimed {:.2}  claimed→completed {:.2}  completed→received {:.2} ms  (n={})",
            t.sent_to_stored_ms,
            t.stored_to_claimed_ms,
            t.claimed_to_completed_ms,
            t.completed_to_received_ms,
            t.n
        );
    }
    if r.backlog > 0 {
        println!(
            "  backlog:            {} requests queued in another queue",
            r.backlog
        );
    }
    if let (Some(e), Some(d)) = (r.enqueue_only_per_s, r.claim_complete_only_per_s) {
        println!("  enqueue only:       {e:.0} requests/s");
        println!("  claim+complete:     {d:.0} requests/s");
    }
    Ok(exit::OK)
}

/// The bench worker process: echoes every input.
pub async fn worker(a: WorkerArgs) -> anyhow::Result<i32> {
    let client = Client::new(a.server)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let workers = (0..a.instances.max(1)).map(|_| {
        Worker::new(client.clone(), a.queue.clone())
            .concurrency(a.concurrency)
            .run_until(
                |job: Job<Box<RawValue>>| async move { Ok::<_, HandlerError>(job.into_input()) },
                stop.clone(),
            )
    });
    let all = futures::future::try_join_all(workers);
    tokio::pin!(all);
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        done = &mut all => { done?; }
        _ = term.recv() => {
            stop.cancel();
            all.await?;
        }
    }
    Ok(exit::OK)
}
