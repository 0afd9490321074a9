//! The single writer: one thread owns the only write connection and
//! **group-commits**. It blocks for the first command, drains every command
//! already waiting (up to [`MAX_BATCH`]), applies them all in one
//! transaction (a command refused by the rules writes nothing; one that fails
//! after writing makes the batch start over with a savepoint per command, so
//! one failing command cannot harm the others) and commits once. Under load the batch grows by itself,
//! so the cost of the commit is shared by everyone who arrived meanwhile.
//!
//! **The fsync is pipelined** ([`crate::sync`]): the commit itself writes the
//! WAL without syncing it; a second thread, the syncer, then fsyncs the WAL
//! once for every commit that finished meanwhile and only after that answers
//! the callers whose answer promises durability (or reveals something that
//! must be durable first). So the writer applies batch N+1 while batch N is
//! being flushed, and no acknowledgement ever leaves before its fsync.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;

use coatcheck_core::clock::to_micros;
use coatcheck_core::model::{new_lease_token, new_request_id};
use coatcheck_core::rules::{self, CancelOutcome};
use coatcheck_core::wire::ChannelMessage;
use coatcheck_core::ReplyTo;
use coatcheck_core::{Request, RetryPolicy, Status, Ts};
use coatcheck_store::{
    Changed, ChannelReceiveParams, ClaimParams, HeartbeatParams, QueueWaker, RequestRef, Result,
    SettleParams, Settlement, StoreError, SubmitParams, Submitted, WebhookDelivery, WebhookOutcome,
};
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::oneshot;

use crate::sql;
use crate::sync::{Answer, SyncJob};

/// The most commands one transaction takes.
pub const MAX_BATCH: usize = 512;

/// Bytes the WAL file is cut back to when it starts over.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// WAL frames (~24 MiB) past which a commit of the writer checkpoints by
/// itself (SQLite's own `wal_autocheckpoint`, a `PASSIVE` checkpoint in the
/// commit). The checkpointer and the catch-up flag (`sync.rs`) keep the WAL
/// under this at the echo benchmark's pace; a writer of large payloads
/// appends faster (over 150 MB/s measured) than the checkpointer looks (every
/// 200 ms), and without this bound its WAL grew past 40 MB between two looks.
const WAL_SAFETY_FRAMES: i64 = 6144;

type Reply<T> = oneshot::Sender<Result<T>>;

/// A write command.
pub enum Cmd {
    Submit(Box<SubmitParams>, Reply<Submitted>),
    /// A submit answered at its commit, before any flush, with the number of
    /// that commit (`sync::Marks`): its caller holds its acknowledgement
    /// until a flush covers it (`Store::request_submit_unsynced`).
    SubmitUnsynced(Box<SubmitParams>, Reply<(Submitted, u64)>),
    /// Answers once everything committed before it is on disk.
    Sync(Reply<()>),
    Claim(ClaimParams, Reply<Vec<Request>>),
    /// A claim that, finding nothing, stays parked under this id until the
    /// writer hands it work or it is unparked (`Store::request_claim_parked`).
    ClaimParked(ClaimParams, Reply<Vec<Request>>, u64),
    /// Look again at the parked claims of a queue, at this time.
    Poke(String, Ts),
    /// Answer the parked claim with this id (of this queue) at once.
    Unpark(String, u64),
    Heartbeat(HeartbeatParams, Reply<Changed>),
    Settle(Vec<SettleParams>, Ts, Reply<Vec<Result<Changed>>>),
    Cancel(RequestRef, Ts, Reply<(CancelOutcome, Changed)>),
    Redrive(RequestRef, Ts, Reply<Changed>),
    ExpireLeases(Ts, u32, Reply<Vec<Changed>>),
    ExpireDeadlines(Ts, u32, Reply<Vec<Changed>>),
    ChannelReceive(ChannelReceiveParams, Reply<Vec<ChannelMessage>>),
    ChannelAck(String, String, Vec<String>, Ts, Reply<Vec<bool>>),
    ChannelPurge(Ts, u32, Reply<u64>),
    WebhookClaim(Ts, u32, std::time::Duration, Reply<Vec<WebhookDelivery>>),
    WebhookRecord(WebhookOutcome, Reply<()>),
    Purge(Ts, u32, Reply<u64>),
    Secret(String, Reply<Vec<u8>>),
}

/// Transaction control through the statement cache: `execute_batch` would
/// parse the SQL again on every call, and these run several times per command.
trait Exec {
    fn exec(&self, sql: &str) -> rusqlite::Result<()>;
}

impl Exec for Connection {
    fn exec(&self, sql: &str) -> rusqlite::Result<()> {
        self.prepare_cached(sql)?.execute([]).map(|_| ())
    }
}

impl Cmd {
    /// Whether the answer waits for the syncer: the command must be
    /// durable, or its answer hands out something (a reply message, a
    /// webhook to deliver) that a power cut must not be able to take back.
    fn gated(&self) -> bool {
        self.must_be_durable() || matches!(self, Cmd::ChannelReceive(..) | Cmd::WebhookClaim(..))
    }

    /// Whether the caller's acknowledgement promises the change is on disk:
    /// a 202 (submit), a completion or failure, a cancel, a redrive, an ack.
    fn must_be_durable(&self) -> bool {
        matches!(
            self,
            Cmd::Submit(..)
                | Cmd::Sync(..)
                | Cmd::Settle(..)
                | Cmd::Cancel(..)
                | Cmd::Redrive(..)
                | Cmd::ChannelAck(..)
                // Expiries may write a reply (with its message_id): a reply
                // that was sent must never be re-made under another id
                // (only when they changed something: `durable_unchanged`).
                | Cmd::ExpireLeases(..)
                | Cmd::ExpireDeadlines(..)
                // Once: tokens signed with a secret lost to a power cut would all turn invalid.
                | Cmd::Secret(..)
        )
    }

    /// Whether the command needs the fsync even when it changed nothing. An
    /// expiry sweep that found nothing due wrote nothing and its empty
    /// answer promises nothing (a sweep woken early, or by the first lease
    /// after a quiet spell, costs no flush); every other durable command
    /// may answer with what an earlier, still unflushed commit wrote (an
    /// idempotent replay of an unsynced submit, a `Sync`), so it is flushed
    /// regardless.
    fn durable_unchanged(&self) -> bool {
        !matches!(self, Cmd::ExpireLeases(..) | Cmd::ExpireDeadlines(..))
    }
}

/// An answer held back until the commit: called with the commit's error, if any.
fn pending<T: Send + 'static>(tx: Reply<T>, res: Result<T>) -> Answer {
    Box::new(move |commit_err| {
        let res = match commit_err {
            Some(e) => Err(e.clone()),
            None => res,
        };
        let _ = tx.send(res);
    })
}

/// What a command produced, kept until the commit decides its answer.
enum Out {
    Submitted(Submitted),
    /// A submit and the number its batch's commit will have.
    SubmittedAt(Submitted, u64),
    Requests(Vec<Request>),
    Changed(Changed),
    Settled(Vec<Result<Changed>>),
    Cancelled(CancelOutcome, Changed),
    Changes(Vec<Changed>),
    Messages(Vec<ChannelMessage>),
    Acks(Vec<bool>),
    Count(u64),
    Webhooks(Vec<WebhookDelivery>),
    Unit,
    Bytes(Vec<u8>),
}

/// Pairs a command's reply channel with what it produced.
fn answer(cmd: Cmd, res: Result<Out>) -> Answer {
    macro_rules! give {
        ($tx:expr, $pat:pat => $v:expr) => {
            pending(
                $tx,
                res.and_then(|out| match out {
                    $pat => Ok($v),
                    _ => Err(StoreError::Internal(
                        "a command produced the wrong kind of result".into(),
                    )),
                }),
            )
        };
    }
    match cmd {
        Cmd::Submit(_, tx) => give!(tx, Out::Submitted(s) => s),
        Cmd::SubmitUnsynced(_, tx) => give!(tx, Out::SubmittedAt(s, commit) => (s, commit)),
        Cmd::Sync(tx) => give!(tx, Out::Unit => ()),
        Cmd::Claim(_, tx) | Cmd::ClaimParked(_, tx, _) => give!(tx, Out::Requests(r) => r),
        Cmd::Poke(..) | Cmd::Unpark(..) => Box::new(|_| {}),
        Cmd::Heartbeat(_, tx) => give!(tx, Out::Changed(c) => c),
        Cmd::Settle(_, _, tx) => give!(tx, Out::Settled(s) => s),
        Cmd::Cancel(_, _, tx) => give!(tx, Out::Cancelled(o, c) => (o, c)),
        Cmd::Redrive(_, _, tx) => give!(tx, Out::Changed(c) => c),
        Cmd::ExpireLeases(_, _, tx) => give!(tx, Out::Changes(c) => c),
        Cmd::ExpireDeadlines(_, _, tx) => give!(tx, Out::Changes(c) => c),
        Cmd::ChannelReceive(_, tx) => give!(tx, Out::Messages(m) => m),
        Cmd::ChannelAck(_, _, _, _, tx) => give!(tx, Out::Acks(a) => a),
        Cmd::ChannelPurge(_, _, tx) => give!(tx, Out::Count(n) => n),
        Cmd::WebhookClaim(_, _, _, tx) => give!(tx, Out::Webhooks(w) => w),
        Cmd::WebhookRecord(_, tx) => give!(tx, Out::Unit => ()),
        Cmd::Purge(_, _, tx) => give!(tx, Out::Count(n) => n),
        Cmd::Secret(_, tx) => give!(tx, Out::Bytes(b) => b),
    }
}

/// Runs the writer loop until every sender is gone, handing durable answers
/// to the syncer ([`crate::sync::spawn`]).
pub fn run(
    conn: Connection,
    rx: mpsc::Receiver<Cmd>,
    retry: RetryPolicy,
    syncer: crate::sync::Syncer,
    synced: std::thread::JoinHandle<()>,
    waker: std::sync::Arc<std::sync::OnceLock<QueueWaker>>,
) {
    // Checkpoints run on the checkpointer's connection, not in our commits —
    // unless the WAL outgrows what the checkpointer keeps up with (see
    // `WAL_SAFETY_FRAMES`); a WAL that grew large is cut back when it starts
    // over.
    for (pragma, value) in [
        ("wal_autocheckpoint", WAL_SAFETY_FRAMES),
        ("journal_size_limit", WAL_SIZE_LIMIT),
    ] {
        if let Err(e) = conn.pragma_update(None, pragma, value) {
            tracing::error!(error = %e, pragma, "cannot set a pragma on the writer");
        }
    }
    let catch_up = syncer.catch_up.clone();
    let hot = match sql::Hot::prepare(&conn) {
        Ok(hot) => hot,
        Err(e) => {
            tracing::error!(error = %e, "cannot prepare the writer's statements; the store refuses writes");
            let e =
                StoreError::Internal(format!("the writer could not prepare its statements: {e}"));
            while let Ok(cmd) = rx.recv() {
                answer(cmd, Err(e.clone()))(None);
            }
            return;
        }
    };
    let w = Writer {
        conn: &conn,
        hot,
        retry,
        cursors: Default::default(),
        sync: syncer,
        waker,
        claimable: Default::default(),
        parked: Default::default(),
        recheck: Default::default(),
        batch_now: Default::default(),
    };
    let mut carried: Option<Cmd> = None;
    while let Some(first) = carried.take().or_else(|| rx.recv().ok()) {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        w.apply_batch(batch, &rx, &mut carried);
        if catch_up.swap(false, std::sync::atomic::Ordering::Relaxed) {
            // Copies what was committed since the checkpointer's run, so the
            // next transaction can start the WAL over (see `sync.rs`).
            if let Err(e) = w
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            {
                tracing::debug!(error = %e, "catch-up checkpoint skipped");
            }
        }
    }
    // Every answer still waiting for an fsync is sent before the writer ends.
    drop(w);
    let _ = synced.join();
}

/// The queues, each once, in their first order (a batch names few).
fn distinct<'a>(queues: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
    let mut seen: Vec<&String> = Vec::new();
    for q in queues {
        if !seen.contains(&q) {
            seen.push(q);
        }
    }
    seen
}

/// What one claim round left at its priority level.
#[derive(PartialEq, Eq)]
enum Round {
    /// It claimed; another round may claim more.
    More,
    /// Nothing more to claim at this level now.
    Done,
}

/// A claim waiting in the writer for work.
struct Parked {
    id: u64,
    p: ClaimParams,
    tx: Reply<Vec<Request>>,
}

struct Writer<'c> {
    conn: &'c Connection,
    /// The statements of every transition, prepared once.
    hot: sql::Hot<'c>,
    retry: RetryPolicy,
    /// The syncer: fsyncs the WAL, then sends the answers that wait for it.
    sync: crate::sync::Syncer,
    /// Told which queues got claimable work, right after the commit.
    waker: std::sync::Arc<std::sync::OnceLock<QueueWaker>>,
    /// Queues that got claimable work in the batch being applied.
    claimable: std::cell::RefCell<Vec<String>>,
    /// Claims waiting for work, per queue, oldest first: the batch that
    /// makes work claimable hands it to them before its commit.
    parked: std::cell::RefCell<HashMap<String, VecDeque<Parked>>>,
    /// Queues with parked claims that the batch may have given work other
    /// than by a submit (a retry, a redrive, a requeued lease, a freed
    /// fairness slot) or that a poke asks to look at again.
    recheck: std::cell::RefCell<Vec<String>>,
    /// The latest `now` of the batch's commands: when parked claims get work.
    batch_now: std::cell::Cell<Option<Ts>>,
    /// Per queue: the priority level and fairness key served last, and how
    /// many of its weight it has used this turn.
    cursors: std::cell::RefCell<std::collections::HashMap<String, (i64, String, u32)>>,
}

impl Writer<'_> {
    /// Applies and commits `batch`. When nothing else is waiting (no
    /// command in `rx`, no commit at the syncer), the writer makes the
    /// commit durable itself instead of handing it over; a command found
    /// waiting is left in `carried` for the next batch.
    fn apply_batch(&self, batch: Vec<Cmd>, rx: &mpsc::Receiver<Cmd>, carried: &mut Option<Cmd>) {
        let mut durable = false;
        self.batch_now.set(None);
        if let Err(e) = self.conn.exec("BEGIN IMMEDIATE").map_err(sql::classify) {
            self.refuse(batch, &e);
            return;
        }
        // Fast path: no savepoints. A command the rules refuse has written
        // nothing (every check comes before the first write), so there is
        // nothing to undo. Only a command that fails *after* writing (an I/O
        // error, a violated constraint) would leave half its writes: then
        // the whole batch starts over with a savepoint per command.
        let cursors = self.cursors.borrow().clone();
        let mut results: Vec<Result<Out>> = Vec::with_capacity(batch.len());
        let mut torn = false;
        for cmd in &batch {
            let before = self.conn.total_changes();
            let res = self.exec(cmd, false);
            let changed = self.conn.total_changes() != before;
            if res.is_err() && changed {
                torn = true;
                break;
            }
            durable |= cmd.must_be_durable() && (changed || cmd.durable_unchanged());
            results.push(res);
        }
        if torn {
            durable = batch.iter().any(Cmd::must_be_durable);
            results.clear();
            self.claimable.borrow_mut().clear();
            self.recheck.borrow_mut().clear();
            *self.cursors.borrow_mut() = cursors;
            self.hot.forget();
            let restart = self
                .conn
                .exec("ROLLBACK")
                .and_then(|()| self.conn.exec("BEGIN IMMEDIATE"))
                .map_err(sql::classify);
            if let Err(e) = restart {
                self.refuse(batch, &e);
                return;
            }
            for cmd in &batch {
                results.push(self.exec_in_savepoint(cmd));
            }
        }
        let mut now: Vec<Answer> = Vec::new();
        let mut gated: Vec<Answer> = Vec::with_capacity(batch.len());
        for (cmd, res) in batch.into_iter().zip(results) {
            match cmd {
                Cmd::ClaimParked(p, tx, id) if matches!(&res, Ok(Out::Requests(got)) if got.is_empty()) =>
                {
                    self.park(p, tx, id);
                }
                Cmd::Unpark(queue, id) => now.extend(self.unpark(&queue, id)),
                cmd if cmd.gated() => gated.push(answer(cmd, res)),
                cmd => now.push(answer(cmd, res)),
            }
        }
        let woken = std::mem::take(&mut *self.claimable.borrow_mut());
        self.hand_over(&woken, &mut now);
        let committed = self
            .hot
            .flush_counts()
            .and_then(|()| self.conn.exec("COMMIT").map_err(sql::classify));
        if let Err(e) = committed {
            self.hot.forget();
            let _ = self.conn.exec("ROLLBACK");
            for a in now.into_iter().chain(gated) {
                a(Some(&e));
            }
            return;
        }
        // Counted before any answer leaves: a caller holding an unsynced
        // submit's answer reads a count that includes its commit.
        self.sync
            .marks
            .committed
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        // The fsync is the long pole: the syncer gets the commit first, so
        // it is not left waiting while the answers below wake other threads
        // (which may take this core from the writer).
        let mut here = None;
        if !gated.is_empty() {
            let job = SyncJob {
                answers: gated,
                fsync: durable,
            };
            let alone = self.sync.idle()
                && match rx.try_recv() {
                    Ok(cmd) => {
                        *carried = Some(cmd);
                        false
                    }
                    Err(_) => true,
                };
            if alone {
                here = Some(job);
            } else if let Err(mpsc::SendError(job)) = self.sync.send(job) {
                let e = StoreError::Unavailable("the store is closing".into());
                for a in job.answers {
                    a(Some(&e));
                }
            }
        }
        // Claims, heartbeats and sweeps promise nothing about the disk: a
        // power cut only repeats work (a lost claim's request is claimed
        // again). They answer at once, while the fsync is in flight — and
        // before the wake-ups below, so a parked claim that was handed work
        // has its answer by the time its waiter is woken.
        for a in now {
            a(None);
        }
        if let Some(wake) = self.waker.get() {
            for q in distinct(&woken) {
                wake(q);
            }
        }
        if let Some(job) = here {
            self.sync.sync_here(job);
        }
    }

    /// Answers a batch that could not start with `e`. An unpark still
    /// answers its parked claim (that needs no transaction).
    fn refuse(&self, batch: Vec<Cmd>, e: &StoreError) {
        for cmd in batch {
            match cmd {
                Cmd::Unpark(queue, id) => {
                    if let Some(a) = self.unpark(&queue, id) {
                        a(None);
                    }
                }
                cmd => answer(cmd, Err(e.clone()))(None),
            }
        }
    }

    /// Notes the time a command carries: parked claims handed work in this
    /// batch are claimed at the latest one.
    fn saw_time(&self, now: Ts) {
        if self.batch_now.get().is_none_or(|t| t < now) {
            self.batch_now.set(Some(now));
        }
    }

    /// After a change to these requests: their queues may have claimable
    /// work again (back to `queued`, or a running one gone, which may free
    /// a fairness slot, or a fallback request spawned), so their parked
    /// claims look again. Noted whether or not a claim is parked yet: a
    /// claim earlier in this very batch parks only after every command ran,
    /// and must still be handed what this change freed.
    fn may_free_work<'a>(&self, now: Ts, changed: impl Iterator<Item = &'a Changed>) {
        self.saw_time(now);
        let mut recheck = self.recheck.borrow_mut();
        // A dead letter's fallback request is new work in its own queue.
        let queues = changed.flat_map(|c| std::iter::once(&c.request).chain(&c.spawned));
        for q in queues.map(|r| &r.queue) {
            if !recheck.contains(q) {
                recheck.push(q.clone());
            }
        }
    }

    /// A claim that found nothing waits for work (closed ones are dropped).
    fn park(&self, p: ClaimParams, tx: Reply<Vec<Request>>, id: u64) {
        let mut parked = self.parked.borrow_mut();
        let waiting = parked.entry(p.queue.clone()).or_default();
        waiting.retain(|w| !w.tx.is_closed());
        waiting.push_back(Parked { id, p, tx });
    }

    /// The answer for a parked claim that stops waiting: empty-handed.
    fn unpark(&self, queue: &str, id: u64) -> Option<Answer> {
        let mut parked = self.parked.borrow_mut();
        let waiting = parked.get_mut(queue)?;
        let at = waiting.iter().position(|w| w.id == id)?;
        let w = waiting.remove(at)?;
        if waiting.is_empty() {
            parked.remove(queue);
        }
        Some(pending(w.tx, Ok(Vec::new())))
    }

    /// Hands the claimable work of these queues (and of those to recheck)
    /// to their parked claims, oldest claim first, inside the batch's
    /// transaction; their answers join `answers`, sent at the commit.
    fn hand_over(&self, claimable: &[String], answers: &mut Vec<Answer>) {
        let recheck = std::mem::take(&mut *self.recheck.borrow_mut());
        if self.parked.borrow().is_empty() {
            return;
        }
        for q in distinct(claimable.iter().chain(&recheck)) {
            self.hand_over_queue(q, answers);
        }
    }

    fn hand_over_queue(&self, queue: &str, answers: &mut Vec<Answer>) {
        loop {
            let w = {
                let mut parked = self.parked.borrow_mut();
                let Some(waiting) = parked.get_mut(queue) else {
                    return;
                };
                let Some(w) = waiting.pop_front() else {
                    parked.remove(queue);
                    return;
                };
                w
            };
            if w.tx.is_closed() {
                continue; // its caller is gone
            }
            let mut p = w.p.clone();
            if let Some(t) = self.batch_now.get().filter(|t| *t > p.now) {
                p.now = t;
            }
            let max = p.max as usize;
            match self.claim_guarded(p) {
                Ok(got) if got.is_empty() => {
                    self.parked
                        .borrow_mut()
                        .entry(queue.to_string())
                        .or_default()
                        .push_front(w);
                    return;
                }
                Ok(got) => {
                    // Fewer than asked: nothing more is claimable here now.
                    let drained = got.len() < max;
                    answers.push(pending(w.tx, Ok(got)));
                    if drained {
                        return;
                    }
                }
                Err(e) => {
                    answers.push(pending(w.tx, Err(e)));
                    return;
                }
            }
        }
    }

    /// Runs `f` inside a savepoint: if it fails, its writes are undone (and
    /// the writer forgets its copies of what it may have changed).
    fn in_savepoint<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mark = self.hot.counts_mark();
        self.conn.exec("SAVEPOINT one").map_err(sql::classify)?;
        let res = f();
        let rollback = if res.is_ok() {
            Ok(())
        } else {
            self.hot.forget_since(mark);
            self.conn.exec("ROLLBACK TO one")
        };
        if let Err(e) = rollback.and_then(|()| self.conn.exec("RELEASE one")) {
            tracing::error!(error = %e, "savepoint end failed");
        }
        res
    }

    /// A claim inside a savepoint, so one that fails after writing leaves
    /// nothing behind in the batch.
    fn claim_guarded(&self, p: ClaimParams) -> Result<Vec<Request>> {
        self.in_savepoint(|| self.claim(p))
    }

    /// Applies one command inside a savepoint; on error its writes are undone.
    fn exec_in_savepoint(&self, cmd: &Cmd) -> Result<Out> {
        self.in_savepoint(|| self.exec(cmd, true))
    }

    /// Applies one command. `guarded`: inside a savepoint, so a settlement
    /// batch may undo a failed item with a savepoint of its own; otherwise
    /// an item that fails after writing fails the whole call.
    fn exec(&self, cmd: &Cmd, guarded: bool) -> Result<Out> {
        Ok(match cmd {
            Cmd::Sync(_) => Out::Unit,
            Cmd::Submit(p, _) | Cmd::SubmitUnsynced(p, _) => {
                self.saw_time(p.now);
                let res = self.submit((**p).clone())?;
                if let Submitted::Created(r) = &res {
                    if r.status == coatcheck_core::Status::Queued
                        && r.run_after.is_none_or(|t| t <= p.now)
                    {
                        self.claimable.borrow_mut().push(r.queue.clone());
                    }
                }
                match cmd {
                    // The writer alone counts commits, one per batch: this
                    // batch's commit is the next number.
                    Cmd::SubmitUnsynced(..) => {
                        let done = self
                            .sync
                            .marks
                            .committed
                            .load(std::sync::atomic::Ordering::Acquire);
                        Out::SubmittedAt(res, done + 1)
                    }
                    _ => Out::Submitted(res),
                }
            }
            Cmd::Claim(p, _) | Cmd::ClaimParked(p, _, _) => {
                self.saw_time(p.now);
                Out::Requests(self.claim(p.clone())?)
            }
            Cmd::Poke(queue, now) => {
                self.saw_time(*now);
                self.recheck.borrow_mut().push(queue.clone());
                Out::Unit
            }
            Cmd::Unpark(..) => Out::Unit,
            Cmd::Heartbeat(p, _) => Out::Changed(self.heartbeat(p.clone())?),
            Cmd::Settle(items, now, _) => {
                let settled = self.settle_many(items, *now, guarded)?;
                self.may_free_work(*now, settled.iter().filter_map(|r| r.as_ref().ok()));
                Out::Settled(settled)
            }
            Cmd::Cancel(r, now, _) => {
                let (outcome, changed) = self.cancel(r.clone(), *now)?;
                self.may_free_work(*now, std::iter::once(&changed));
                Out::Cancelled(outcome, changed)
            }
            Cmd::Redrive(r, now, _) => {
                let changed = self.redrive(r.clone(), *now)?;
                self.may_free_work(*now, std::iter::once(&changed));
                Out::Changed(changed)
            }
            Cmd::ExpireLeases(now, limit, _) => {
                let changes = self.expire_leases(*now, *limit)?;
                self.may_free_work(*now, changes.iter());
                Out::Changes(changes)
            }
            Cmd::ExpireDeadlines(now, limit, _) => {
                let changes = self.expire_deadlines(*now, *limit)?;
                self.may_free_work(*now, changes.iter());
                Out::Changes(changes)
            }
            Cmd::ChannelReceive(p, _) => Out::Messages(self.channel_receive(p.clone())?),
            Cmd::ChannelAck(t, c, tokens, now, _) => {
                Out::Acks(self.channel_ack(t.clone(), c.clone(), tokens.clone(), *now)?)
            }
            Cmd::ChannelPurge(before, limit, _) => Out::Count(self.channel_purge(*before, *limit)?),
            Cmd::WebhookClaim(now, limit, lease, _) => {
                Out::Webhooks(self.webhook_claim(*now, *limit, *lease)?)
            }
            Cmd::WebhookRecord(o, _) => {
                self.webhook_record(o.clone())?;
                Out::Unit
            }
            Cmd::Purge(before, limit, _) => Out::Count(self.purge(*before, *limit)?),
            Cmd::Secret(name, _) => Out::Bytes(self.secret(name)?),
        })
    }

    fn load(&self, r: &RequestRef) -> Result<Request> {
        let req = self.hot.load(&r.id)?.ok_or(StoreError::NotFound)?;
        match &r.tenant {
            Some(t) if *t != req.tenant => Err(StoreError::NotFound),
            _ => Ok(req),
        }
    }

    /// Writes a transitioned request (`was`: its status when loaded) and its
    /// new events. Both are first rounded to what is stored (see
    /// [`sql::as_stored`]), so the request the caller answers with equals the
    /// one a later read returns.
    fn save(
        &self,
        was: Status,
        req: &mut Request,
        events: &mut [coatcheck_core::HistoryEvent],
    ) -> Result<()> {
        sql::as_stored(req, events);
        self.hot.update(was, req)?;
        self.hot.insert_history(&req.id, events)
    }

    /// A named secret: created at random if absent, then read back. The
    /// writer is the only writer, so every caller reads the same bytes.
    fn secret(&self, name: &str) -> Result<Vec<u8>> {
        let fresh: [u8; 32] = rand::random();
        self.conn
            .prepare_cached(
                "INSERT INTO secrets (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
            )
            .and_then(|mut s| s.execute(rusqlite::params![name, &fresh[..]]))
            .map_err(sql::classify)?;
        self.conn
            .prepare_cached("SELECT value FROM secrets WHERE name = ?1")
            .and_then(|mut s| s.query_row([name], |r| r.get::<_, Vec<u8>>(0)))
            .map_err(sql::classify)
    }

    fn submit(&self, p: SubmitParams) -> Result<Submitted> {
        if let Some(idem) = &p.idempotency {
            let mut stmt = self
                .conn
                .prepare_cached(sql::SELECT_IDEMPOTENCY)
                .map_err(sql::classify)?;
            let mut rows = stmt
                .query([&p.new.tenant, &idem.key])
                .map_err(sql::classify)?;
            if let Some(row) = rows.next().map_err(sql::classify)? {
                let id: String = row.get(0).map_err(sql::classify)?;
                let hash: Option<String> = row.get(1).map_err(sql::classify)?;
                if hash.as_deref() != Some(idem.body_hash.as_str()) {
                    return Err(StoreError::IdempotencyMismatch);
                }
                let req = self.hot.load(&id)?.ok_or(StoreError::NotFound)?;
                return Ok(Submitted::Replayed(req));
            }
        }
        let (mut req, mut events) = rules::submit(p.new, p.now);
        sql::as_stored(&mut req, &mut events);
        let idem = p
            .idempotency
            .as_ref()
            .map(|i| (i.key.as_str(), i.body_hash.as_str()));
        self.hot.insert(&req, idem)?;
        self.hot.insert_history(&req.id, &events)?;
        Ok(Submitted::Created(req))
    }

    /// Fair claiming: levels of priority from the top; within a level,
    /// turns across fairness keys in key order starting after the key served
    /// last (the per-queue cursor), `weight` requests per turn, skipping keys
    /// at their running cap; within a key, oldest first. Every step is an
    /// index seek on `requests_fair`, so a deep backlog costs nothing.
    fn claim(&self, p: ClaimParams) -> Result<Vec<Request>> {
        let now = to_micros(p.now);
        let mut out: Vec<Request> = Vec::with_capacity(p.max as usize);
        let mut level: Option<i64> =
            self.one(sql::NEXT_LEVEL, rusqlite::params![p.queue, i64::MAX])?;
        while let Some(prio) = level {
            loop {
                let need = p.max as usize - out.len();
                if need == 0 {
                    return Ok(out);
                }
                if self.claim_round(&p, prio, now, &mut out)? == Round::Done {
                    break;
                }
            }
            level = self.one(sql::NEXT_LEVEL, rusqlite::params![p.queue, prio])?;
        }
        Ok(out)
    }

    /// One turn of every key at a priority level.
    fn claim_round(
        &self,
        p: &ClaimParams,
        prio: i64,
        now: i64,
        out: &mut Vec<Request>,
    ) -> Result<Round> {
        let (cursor, used) = {
            let cursors = self.cursors.borrow();
            match cursors.get(&p.queue).filter(|(lp, _, _)| *lp == prio) {
                Some((_, k, used)) => (Some(k.clone()), *used),
                None => (None, 0),
            }
        };
        // Keys after the cursor, then from the first up to and including it.
        let limit = p.max as usize * 4 + 64; // enough candidates for one call
        let mut keys: Vec<String> = Vec::new();
        // The key served last continues its turn if its weight is not used up.
        let resume = cursor.clone().filter(|c| used < p.fairness.weight(c));
        if let Some(c) = &resume {
            keys.push(c.clone());
        }
        if let Some(c) = &cursor {
            let mut after = c.clone();
            while keys.len() < limit {
                let Some(k) =
                    self.one::<String>(sql::NEXT_KEY, rusqlite::params![p.queue, prio, after])?
                else {
                    break;
                };
                after = k.clone();
                keys.push(k);
            }
        }
        let mut next = self.first_key(&p.queue, prio)?;
        while let Some(k) = next {
            if keys.len() >= limit
                || cursor
                    .as_ref()
                    .is_some_and(|c| k > *c || (k == *c && resume.is_some()))
            {
                break;
            }
            next = self.one::<String>(sql::NEXT_KEY, rusqlite::params![p.queue, prio, k])?;
            keys.push(k);
        }
        // One key alone at this level takes every turn in a row: its turns
        // are taken at once (the cursor ends as after those turns), instead
        // of one round of queries per `weight` requests.
        let alone = keys.len() == 1;
        let mut progressed = false;
        for (i, key) in keys.into_iter().enumerate() {
            let need = p.max as usize - out.len();
            if need == 0 {
                break;
            }
            let already = if resume.as_ref() == Some(&key) && i == 0 {
                used
            } else {
                0
            };
            let weight = p.fairness.weight(&key);
            let mut take = if alone {
                need
            } else {
                ((weight - already) as usize).min(need)
            };
            if let Some(cap) = p.fairness.cap(&key) {
                let running: i64 = self
                    .one(sql::KEY_RUNNING, rusqlite::params![p.queue, key])?
                    .unwrap_or(0);
                take = take.min((cap as i64 - running).max(0) as usize);
            }
            if take == 0 {
                if alone {
                    return Ok(Round::Done);
                }
                continue;
            }
            let ids = sql::ids(
                self.conn,
                sql::KEY_HEADS,
                rusqlite::params![p.queue, prio, key, now, take as i64],
            )?;
            let mut got = 0;
            for id in ids {
                let Some(mut req) = self.hot.load(&id)? else {
                    continue;
                };
                let was = req.status;
                if let Ok(mut events) =
                    rules::claim(&mut req, &p.worker_id, p.lease, new_lease_token(), p.now)
                {
                    self.save(was, &mut req, &mut events)?;
                    out.push(req);
                    got += 1;
                }
            }
            if got > 0 {
                progressed = true;
                // Turns of `weight` in a row: the last one has used this many.
                let used = (already as usize + got - 1) % weight as usize + 1;
                self.cursors
                    .borrow_mut()
                    .insert(p.queue.clone(), (prio, key, used as u32));
            }
            if alone && got < take {
                // Fewer than asked of the only key: this level is drained.
                return Ok(Round::Done);
            }
        }
        Ok(if progressed { Round::More } else { Round::Done })
    }

    fn first_key(&self, queue: &str, prio: i64) -> Result<Option<String>> {
        // "" sorts before every key except the empty one, which cannot exist
        // (a fairness key defaults to the non-empty tenant) — but be exact:
        let mut stmt = self
            .conn
            .prepare_cached("SELECT fairness_key FROM requests WHERE queue = ?1 AND status = 'queued' AND priority = ?2 ORDER BY fairness_key LIMIT 1")
            .map_err(sql::classify)?;
        stmt.query_row(rusqlite::params![queue, prio], |r| r.get(0))
            .optional()
            .map_err(sql::classify)
    }

    fn one<T: rusqlite::types::FromSql>(
        &self,
        q: &str,
        params: impl rusqlite::Params,
    ) -> Result<Option<T>> {
        let mut stmt = self.conn.prepare_cached(q).map_err(sql::classify)?;
        stmt.query_row(params, |r| r.get::<_, Option<T>>(0))
            .optional()
            .map(Option::flatten)
            .map_err(sql::classify)
    }

    fn heartbeat(&self, p: HeartbeatParams) -> Result<Changed> {
        let mut req = self.load(&RequestRef::any(p.id))?;
        let was = req.status;
        let events = rules::heartbeat(&mut req, &p.lease_token, p.progress, p.extend, p.now)?;
        self.after_transition(was, req, events, p.now)
    }

    fn settle_many(
        &self,
        items: &[SettleParams],
        now: Ts,
        guarded: bool,
    ) -> Result<Vec<Result<Changed>>> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if guarded {
                let mark = self.hot.counts_mark();
                self.conn.exec("SAVEPOINT item").map_err(sql::classify)?;
                let res = self.settle(item.clone(), now);
                if res.is_err() {
                    self.hot.forget_since(mark);
                    self.conn.exec("ROLLBACK TO item").map_err(sql::classify)?;
                }
                self.conn.exec("RELEASE item").map_err(sql::classify)?;
                out.push(res);
            } else {
                let before = self.conn.total_changes();
                let res = self.settle(item.clone(), now);
                if res.is_err() && self.conn.total_changes() != before {
                    // Half-written: failing the whole call makes the batch
                    // start over with savepoints (see `apply_batch`).
                    return Err(StoreError::Internal("a settlement failed half-way".into()));
                }
                out.push(res);
            }
        }
        Ok(out)
    }

    fn settle(&self, item: SettleParams, now: Ts) -> Result<Changed> {
        let mut req = self.load(&RequestRef::any(item.id))?;
        if item.queue.as_ref().is_some_and(|q| *q != req.queue) {
            return Err(StoreError::NotFound);
        }
        let was = req.status;
        let events = match item.settlement {
            Settlement::Complete { output } => {
                rules::complete(&mut req, &item.lease_token, output, now)?
            }
            Settlement::Fail {
                error,
                retryable,
                retry_after,
            } => rules::fail(
                &mut req,
                &item.lease_token,
                error,
                retryable,
                retry_after,
                &self.retry,
                rand::random::<f64>(),
                now,
            )?,
        };
        self.after_transition(was, req, events, now)
    }

    /// Saves a transitioned request — and, in the same transaction, the
    /// fallback request if it just dead-lettered with a fallback queue, and
    /// its reply if it just became terminal with a return address. So a
    /// crash can never lose a reply, nor send one for an unrecorded outcome.
    fn after_transition(
        &self,
        was: Status,
        mut req: Request,
        mut events: Vec<coatcheck_core::HistoryEvent>,
        now: Ts,
    ) -> Result<Changed> {
        let mut spawned = None;
        if !events.is_empty() {
            if let Some((new, more)) = rules::fallback(&mut req, new_request_id(), now) {
                events.extend(more);
                let (mut fb, mut fb_events) = rules::submit(new, now);
                sql::as_stored(&mut fb, &mut fb_events);
                self.hot.insert(&fb, None)?;
                self.hot.insert_history(&fb.id, &fb_events)?;
                spawned = Some(fb);
            }
        }
        let reply = rules::reply(&mut req, &mut events, now);
        self.save(was, &mut req, &mut events)?;
        if let Some(r) = &reply {
            self.write_reply(&req, r, now)?;
        }
        Ok(Changed {
            request: req,
            spawned,
            reply: reply.map(|r| r.to),
        })
    }

    fn write_reply(&self, req: &Request, reply: &rules::Reply, now: Ts) -> Result<()> {
        let body = serde_json::to_string(&reply.message)
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let m = &reply.message;
        let at = to_micros(now);
        match &reply.to {
            ReplyTo::Channel(channel) => {
                let mut stmt = self
                    .conn
                    .prepare_cached(sql::INSERT_CHANNEL_MESSAGE)
                    .map_err(sql::classify)?;
                stmt.execute(rusqlite::params![
                    req.tenant,
                    channel,
                    m.message_id,
                    m.request_id,
                    body,
                    at
                ])
                .map_err(sql::classify)?;
            }
            ReplyTo::Webhook(w) => {
                let mut stmt = self
                    .conn
                    .prepare_cached(sql::INSERT_WEBHOOK)
                    .map_err(sql::classify)?;
                stmt.execute(rusqlite::params![
                    m.message_id,
                    m.request_id,
                    w.url,
                    body,
                    at
                ])
                .map_err(sql::classify)?;
            }
        }
        Ok(())
    }

    fn channel_receive(&self, p: ChannelReceiveParams) -> Result<Vec<ChannelMessage>> {
        let now = to_micros(p.now);
        let hidden_until = to_micros(coatcheck_core::clock::add(p.now, p.visibility));
        let rows: Vec<(i64, String, u32)> = {
            let mut stmt = self
                .conn
                .prepare_cached(sql::SELECT_CHANNEL_VISIBLE)
                .map_err(sql::classify)?;
            let rows = stmt
                .query_map(
                    rusqlite::params![p.tenant, p.channel, now, p.max as i64],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map_err(sql::classify)?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(sql::classify)?
        };
        let mut out = Vec::with_capacity(rows.len());
        let mut stmt = self
            .conn
            .prepare_cached(sql::UPDATE_CHANNEL_DELIVERED)
            .map_err(sql::classify)?;
        for (seq, body, deliveries) in rows {
            let ack_token = new_lease_token();
            stmt.execute(rusqlite::params![seq, hidden_until, ack_token])
                .map_err(sql::classify)?;
            let message =
                serde_json::from_str(&body).map_err(|e| StoreError::Internal(e.to_string()))?;
            out.push(ChannelMessage {
                message,
                ack_token,
                delivery_count: deliveries + 1,
            });
        }
        Ok(out)
    }

    fn channel_ack(
        &self,
        tenant: String,
        channel: String,
        tokens: Vec<String>,
        now: Ts,
    ) -> Result<Vec<bool>> {
        let mut stmt = self
            .conn
            .prepare_cached(sql::DELETE_CHANNEL_ACKED)
            .map_err(sql::classify)?;
        tokens
            .iter()
            .map(|t| {
                stmt.execute(rusqlite::params![tenant, channel, t, to_micros(now)])
                    .map(|n| n > 0)
                    .map_err(sql::classify)
            })
            .collect()
    }

    fn channel_purge(&self, before: Ts, limit: u32) -> Result<u64> {
        let mut stmt = self
            .conn
            .prepare_cached(sql::DELETE_CHANNEL_BEFORE)
            .map_err(sql::classify)?;
        let n = stmt
            .execute(rusqlite::params![to_micros(before), limit as i64])
            .map_err(sql::classify)?;
        Ok(n as u64)
    }

    fn webhook_claim(
        &self,
        now: Ts,
        limit: u32,
        lease: std::time::Duration,
    ) -> Result<Vec<WebhookDelivery>> {
        let rows: Vec<WebhookDelivery> = {
            let mut stmt = self
                .conn
                .prepare_cached(sql::SELECT_WEBHOOKS_DUE)
                .map_err(sql::classify)?;
            let rows = stmt
                .query_map(rusqlite::params![to_micros(now), limit as i64], |r| {
                    Ok(WebhookDelivery {
                        message_id: r.get(0)?,
                        request_id: r.get(1)?,
                        url: r.get(2)?,
                        body: r.get(3)?,
                        attempt: r.get::<_, u32>(4)? + 1,
                        created_at: coatcheck_core::clock::from_micros(r.get(5)?),
                    })
                })
                .map_err(sql::classify)?;
            rows.collect::<rusqlite::Result<_>>()
                .map_err(sql::classify)?
        };
        let until = to_micros(coatcheck_core::clock::add(now, lease));
        let mut stmt = self
            .conn
            .prepare_cached(sql::LEASE_WEBHOOK)
            .map_err(sql::classify)?;
        for d in &rows {
            stmt.execute(rusqlite::params![d.message_id, until])
                .map_err(sql::classify)?;
        }
        Ok(rows)
    }

    fn purge(&self, before: Ts, limit: u32) -> Result<u64> {
        let doomed: Vec<(String, String, String)> = self
            .conn
            .prepare_cached(sql::SELECT_PURGEABLE)
            .and_then(|mut s| {
                s.query_map(rusqlite::params![to_micros(before), limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect()
            })
            .map_err(sql::classify)?;
        for (id, queue, status) in &doomed {
            for q in [
                sql::DELETE_HISTORY,
                sql::DELETE_SETTLED_WEBHOOKS,
                sql::DELETE_REQUEST,
            ] {
                self.conn
                    .prepare_cached(q)
                    .and_then(|mut s| s.execute([id]))
                    .map_err(sql::classify)?;
            }
            if let Some(status) = Status::parse(status) {
                self.hot.count(queue, status, -1);
            }
        }
        Ok(doomed.len() as u64)
    }

    fn webhook_record(&self, o: WebhookOutcome) -> Result<()> {
        let state = if o.delivered {
            "delivered"
        } else if o.next_attempt_at.is_some() {
            "pending"
        } else {
            "failed"
        };
        let n = {
            let mut stmt = self
                .conn
                .prepare_cached(sql::RECORD_WEBHOOK)
                .map_err(sql::classify)?;
            stmt.execute(rusqlite::params![
                o.message_id,
                o.attempt,
                state,
                o.next_attempt_at.map(to_micros)
            ])
            .map_err(sql::classify)?
        };
        if n == 0 {
            return Ok(()); // already settled (e.g. by a slower duplicate attempt)
        }
        let request_id: String = self
            .conn
            .prepare_cached(sql::SELECT_WEBHOOK_REQUEST)
            .and_then(|mut s| s.query_row([&o.message_id], |r| r.get(0)))
            .map_err(sql::classify)?;
        let mut req = self.load(&RequestRef::any(request_id))?;
        let was = req.status;
        let kind = o.history_event(o.next_attempt_at);
        let mut events = rules::record(&mut req, kind, o.now);
        self.save(was, &mut req, &mut events)
    }

    fn cancel(&self, r: RequestRef, now: Ts) -> Result<(CancelOutcome, Changed)> {
        let mut req = self.load(&r)?;
        let was = req.status;
        let (outcome, events) = rules::cancel(&mut req, now)?;
        Ok((outcome, self.after_transition(was, req, events, now)?))
    }

    fn redrive(&self, r: RequestRef, now: Ts) -> Result<Changed> {
        let mut req = self.load(&r)?;
        let was = req.status;
        let events = rules::redrive(&mut req, now)?;
        self.after_transition(was, req, events, now)
    }

    fn expire_leases(&self, now: Ts, limit: u32) -> Result<Vec<Changed>> {
        let ids = sql::ids(
            self.conn,
            sql::SELECT_LEASES_DUE,
            rusqlite::params![coatcheck_core::clock::to_micros(now), limit as i64],
        )?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let mut req = self.load(&RequestRef::any(id))?;
            let was = req.status;
            if let Ok(events) = rules::expire_lease(&mut req, now) {
                out.push(self.after_transition(was, req, events, now)?);
            }
        }
        Ok(out)
    }

    fn expire_deadlines(&self, now: Ts, limit: u32) -> Result<Vec<Changed>> {
        let ids = sql::ids(
            self.conn,
            sql::SELECT_DEADLINES_DUE,
            rusqlite::params![coatcheck_core::clock::to_micros(now), limit as i64],
        )?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let mut req = self.load(&RequestRef::any(id))?;
            let was = req.status;
            if let Ok(events) = rules::expire_deadline(&mut req, now) {
                out.push(self.after_transition(was, req, events, now)?);
            }
        }
        Ok(out)
    }
}
