//! The notifier: wakes long-polls, claims and streams when something changed,
//! so nothing ever busy-polls the store.
//!
//! Keys are a queue (a claimable request may be there) or a request (it
//! changed). A waiter subscribes *before* it looks at the store and then
//! waits for a change, so a change between the look and the wait is never
//! lost. Each key is a `watch` channel carrying a counter; entries disappear
//! when their last subscriber goes. Across nodes, PostgreSQL LISTEN/NOTIFY
//! feeds the same hub.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use coatcheck_core::Request;
use serde_json::value::RawValue;
use tokio::sync::{broadcast, watch, Notify};

/// What a key's channel carries (every send wakes its subscribers): for a
/// request key, the request as the latest change left it, when the change
/// came with it — so a waiter need not read it back.
type Carried = Option<Arc<Request>>;

/// A change that came without the request.
fn bare(v: &mut Carried) {
    *v = None;
}

/// What a waiter waits on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// Claimable work may have appeared in this queue.
    Queue(String),
    /// This request changed.
    Request(String),
    /// This request may have finished (reached a terminal status): what
    /// long-polls and `Prefer: wait` wait on, so the changes before the end
    /// (a claim, a heartbeat) do not wake them for nothing.
    Finished(String),
    /// A message may be receivable on this channel of this tenant.
    Channel(String, String),
    /// Time passed: delayed work may have come due, or the clock moved —
    /// the one kind of new claimable work that a store which parks claims
    /// (and sees every change itself) cannot notice on its own.
    Due,
}

/// The in-process hub.
#[derive(Debug, Default, Clone)]
pub struct Notifier {
    keys: Arc<Mutex<HashMap<Key, watch::Sender<Carried>>>>,
    /// Claims waiting for work, per queue (see [`ClaimWaiters`]).
    claimers: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    /// Every carried change of a request, per request id (see [`Snapshots`]).
    snapshots: Arc<Mutex<HashMap<String, broadcast::Sender<Arc<Request>>>>>,
}

/// How many changes of one request a [`Snapshots`] holds before the oldest
/// are dropped (its reader then falls back to reading the request).
const SNAPSHOTS: usize = 64;

/// A change's state to keep for a stream: the request without its input,
/// which never changes (the stream has it from its own read) and may be a
/// megabyte — a stream that falls behind holds up to [`SNAPSHOTS`] of these.
fn without_input(req: &Request) -> Request {
    let mut kept = req.clone();
    kept.input = RawValue::from_string("null".into()).expect("null is JSON");
    kept
}

/// Every change of one request made on this node, each with the request as
/// that change left it (but its `input`, which never changes, left out as
/// `null`) — where a [`Subscription`] keeps only the latest. An
/// event stream pairs each history event with the state it produced, even
/// when several changes land before the stream looks (a progress report
/// and the completion right after it). Changes made on other nodes come
/// without the request (LISTEN/NOTIFY carries ids) and are not here.
#[derive(Debug)]
pub struct Snapshots {
    id: String,
    rx: Option<broadcast::Receiver<Arc<Request>>>,
    hub: Notifier,
}

impl Snapshots {
    /// The changes received since the last call, in the order they were
    /// reported, and whether some were dropped (the reader fell behind).
    pub fn drain(&mut self) -> (Vec<Arc<Request>>, bool) {
        let mut got = Vec::new();
        let mut lagged = false;
        if let Some(rx) = self.rx.as_mut() {
            loop {
                match rx.try_recv() {
                    Ok(r) => got.push(r),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                    Err(_) => break,
                }
            }
        }
        (got, lagged)
    }
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut snaps = self.hub.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        if snaps
            .get(&self.id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            snaps.remove(&self.id);
        }
    }
}

/// The claims of one queue that wait for work to appear — woken **one per
/// notification**, not all at once: a submit makes one request claimable,
/// so it wakes one waiting claim (the one that waited longest), and a
/// hundred idle workers on a queue cost one claim per submit, not a hundred
/// (a thundering herd: measured as a third of the throughput on
/// PostgreSQL). A waiter that got as many requests as it asked for passes
/// the wake-up on ([`ClaimWaiters::more`]), since more may be waiting; a
/// waiter that was woken but went away (its caller gave up) hands its
/// wake-up to the next one. Changes that may concern any number of
/// requests (time passing, a resync after a lost connection) still wake
/// them all.
#[derive(Debug)]
pub struct ClaimWaiters {
    queue: String,
    notify: Arc<Notify>,
    hub: Notifier,
}

impl ClaimWaiters {
    /// The wake-up to wait for: create it (and enable it) *before* looking
    /// at the store, so a notification in between is not lost.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Wakes the next waiting claim: the caller took all it asked for, and
    /// there may be more.
    pub fn more(&self) {
        self.notify.notify_one();
    }
}

impl Drop for ClaimWaiters {
    fn drop(&mut self) {
        let mut claimers = self.hub.claimers.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and ours: no other waiter is left.
        if Arc::strong_count(&self.notify) <= 2 {
            claimers.remove(&self.queue);
        }
    }
}

/// A subscription; wait on it with [`Subscription::changed`].
#[derive(Debug)]
pub struct Subscription {
    key: Key,
    rx: Option<watch::Receiver<Carried>>,
    hub: Notifier,
}

impl Subscription {
    /// Resolves at the next notification of this key after the subscription
    /// was made (or after the previous `changed`).
    pub async fn changed(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The request as the latest notification of this key left it, if the
    /// notification carried it (see [`Notifier::notify_request`]).
    pub fn latest(&self) -> Option<Arc<Request>> {
        self.rx.as_ref().and_then(|rx| rx.borrow().clone())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut keys = self.hub.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            keys.remove(&self.key);
        }
    }
}

impl Notifier {
    /// A new, empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes to a key.
    pub fn subscribe(&self, key: Key) -> Subscription {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let rx = keys
            .entry(key.clone())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        Subscription {
            key,
            rx: Some(rx),
            hub: self.clone(),
        }
    }

    /// Every change of request `id` from now on, each with its state
    /// ([`Snapshots`]). Take it *before* reading the request.
    pub fn snapshots(&self, id: &str) -> Snapshots {
        let mut snaps = self.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        let rx = snaps
            .entry(id.to_string())
            .or_insert_with(|| broadcast::channel(SNAPSHOTS).0)
            .subscribe();
        Snapshots {
            id: id.to_string(),
            rx: Some(rx),
            hub: self.clone(),
        }
    }

    /// The claims waiting on `queue`, to join them.
    pub fn claim_waiters(&self, queue: &str) -> ClaimWaiters {
        let mut claimers = self.claimers.lock().unwrap_or_else(|e| e.into_inner());
        let notify = claimers
            .entry(queue.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone();
        ClaimWaiters {
            queue: queue.to_string(),
            notify,
            hub: self.clone(),
        }
    }

    /// Wakes every subscriber of a key — except the claims waiting on a
    /// queue, of which one is woken ([`ClaimWaiters`]). A change of a
    /// request that came without it (from another node, say) may have
    /// finished it, so it also wakes those waiting for it to finish.
    pub fn notify(&self, key: &Key) {
        if let Key::Queue(queue) = key {
            let claimers = self.claimers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = claimers.get(queue) {
                n.notify_one();
            }
        }
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = keys.get(key) {
            tx.send_modify(bare);
        }
        if let Key::Request(id) = key {
            if let Some(tx) = keys.get(&Key::Finished(id.clone())) {
                tx.send_modify(bare);
            }
        }
    }

    /// Wakes every subscriber of this request's key — and, if it finished,
    /// of its [`Key::Finished`] — handing them the request as it is now
    /// (copied only if someone is waiting). Changes can be reported out of
    /// order (two tasks finishing at once): an older state never replaces
    /// a newer one that was already handed over.
    pub fn notify_request(&self, req: &Request) {
        {
            // Before the wake-ups: a stream woken by this change finds its
            // state already there.
            let snaps = self.snapshots.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(tx) = snaps.get(&req.id) {
                let _ = tx.send(Arc::new(without_input(req)));
            }
        }
        let mut copy: Option<Arc<Request>> = None;
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let mut hand_over = |key: Key| {
            if let Some(tx) = keys.get(&key) {
                tx.send_if_modified(|v| {
                    if v.as_ref()
                        .is_some_and(|newer| newer.history_seq > req.history_seq)
                    {
                        return false;
                    }
                    *v = Some(copy.get_or_insert_with(|| Arc::new(req.clone())).clone());
                    true
                });
            }
        };
        hand_over(Key::Request(req.id.clone()));
        if req.status.is_terminal() {
            hand_over(Key::Finished(req.id.clone()));
        }
    }

    /// Wakes every subscriber of every queue (a delayed request became
    /// claimable, or the clock moved).
    pub fn notify_all_queues(&self) {
        self.wake_all_claimers();
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        for (key, tx) in keys.iter() {
            if matches!(key, Key::Queue(_) | Key::Due) {
                tx.send_modify(bare);
            }
        }
    }

    /// Wakes every subscriber of every channel (a message became visible again).
    pub fn notify_all_channels(&self) {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        for (key, tx) in keys.iter() {
            if matches!(key, Key::Channel(..)) {
                tx.send_modify(bare);
            }
        }
    }

    /// Wakes every subscriber of every key (changes may have been missed).
    pub fn notify_all(&self) {
        self.wake_all_claimers();
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        for tx in keys.values() {
            tx.send_modify(bare);
        }
    }

    /// Wakes every waiting claim of every queue.
    fn wake_all_claimers(&self) {
        let claimers = self.claimers.lock().unwrap_or_else(|e| e.into_inner());
        for n in claimers.values() {
            n.notify_waiters();
        }
    }

    /// How many keys (and queues with waiting claims) have subscribers
    /// (for tests and metrics).
    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).len()
            + self
                .claimers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len()
    }

    /// Whether no key has subscribers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    /// A running request `id` at `history_seq`.
    pub(crate) fn running(id: &str, history_seq: u64) -> Request {
        let mut r: Request = serde_json::from_value(serde_json::json!({
            "id": id, "tenant": "t", "queue": "q", "status": "running",
            "priority": 0, "attempts": 1, "max_attempts": 3, "cancel_requested": false,
            "input": {}, "fairness_key": "", "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z"
        }))
        .expect("a request");
        // Not on the wire: set it.
        r.history_seq = history_seq;
        r
    }

    /// Where a subscription keeps the latest change, snapshots keep every
    /// carried change of their request, in order, each as it was; bare
    /// changes and other requests add none; the last reader gone, the
    /// entry goes.
    #[test]
    fn snapshots_keep_every_change_each_as_it_was() {
        use coatcheck_core::Status;
        let hub = Notifier::new();
        let mut snaps = hub.snapshots("r1");
        let mut req = running("r1", 3);
        req.progress = Some(serde_json::value::to_raw_value(&50).unwrap());
        hub.notify_request(&req);
        hub.notify(&Key::Request("r1".into()));
        hub.notify_request(&running("r2", 9));
        req.status = Status::Succeeded;
        req.history_seq = 4;
        hub.notify_request(&req);
        let (got, lagged) = snaps.drain();
        assert!(!lagged);
        let got: Vec<(u64, Status, Option<String>)> = got
            .iter()
            .map(|r| {
                (
                    r.history_seq,
                    r.status,
                    r.progress.as_ref().map(|p| p.get().to_string()),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (3, Status::Running, Some("50".to_string())),
                (4, Status::Succeeded, Some("50".to_string()))
            ]
        );
        assert!(snaps.drain().0.is_empty(), "each change once");
        // Kept without the input, which never changes and may be large.
        hub.notify_request(&req);
        let (kept, _) = snaps.drain();
        assert_eq!(kept[0].input.get(), "null");
        assert_ne!(req.input.get(), "null");
        // A reader that falls behind is told so, and keeps the latest.
        for seq in 0..(SNAPSHOTS as u64 + 5) {
            hub.notify_request(&running("r1", 10 + seq));
        }
        let (got, lagged) = snaps.drain();
        assert!(lagged);
        assert_eq!(
            got.last().map(|r| r.history_seq),
            Some(10 + SNAPSHOTS as u64 + 4)
        );
        drop(snaps);
        assert!(hub.snapshots.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_notification_after_subscribing_is_never_lost() {
        let hub = Notifier::new();
        let mut sub = hub.subscribe(Key::Request("a".into()));
        hub.notify(&Key::Request("a".into()));
        tokio::time::timeout(Duration::from_secs(1), sub.changed())
            .await
            .unwrap();
    }

    /// A waiter for the end sleeps through a claim and wakes, with the
    /// request, when it finishes; a bare change of the request (from
    /// another node) wakes it too, since it may have been the end.
    #[tokio::test]
    async fn finish_waiters_wake_only_when_it_may_have_finished() {
        use coatcheck_core::Status;
        let hub = Notifier::new();
        let mut req = running("r1", 2);
        let mut end = hub.subscribe(Key::Finished("r1".into()));
        let mut every = hub.subscribe(Key::Request("r1".into()));
        hub.notify_request(&req);
        tokio::time::timeout(Duration::from_secs(1), every.changed())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), end.changed())
                .await
                .is_err(),
            "a running request did not finish"
        );
        req.status = Status::Succeeded;
        req.history_seq = 3;
        hub.notify_request(&req);
        tokio::time::timeout(Duration::from_secs(1), end.changed())
            .await
            .unwrap();
        assert_eq!(end.latest().map(|r| r.status), Some(Status::Succeeded));
        hub.notify(&Key::Request("r1".into()));
        tokio::time::timeout(Duration::from_secs(1), end.changed())
            .await
            .unwrap();
    }

    /// Parked claims listen to `Due` only: a queue's wake-ups (changes the
    /// store already handed to them) leave them asleep; time passing wakes
    /// them.
    #[tokio::test]
    async fn due_wakes_on_time_passing_not_on_queue_changes() {
        let hub = Notifier::new();
        let mut due = hub.subscribe(Key::Due);
        hub.notify(&Key::Queue("q".into()));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), due.changed())
                .await
                .is_err()
        );
        hub.notify_all_queues();
        tokio::time::timeout(Duration::from_secs(1), due.changed())
            .await
            .expect("woken when delayed work may have come due");
    }

    /// A queue's notification wakes one waiting claim, the one that waited
    /// longest; the next notification the next one; "all queues" all.
    #[tokio::test]
    async fn a_queue_notification_wakes_one_waiting_claim() {
        let hub = Notifier::new();
        let waiters: Vec<ClaimWaiters> = (0..3).map(|_| hub.claim_waiters("q")).collect();
        let mut waits: Vec<_> = waiters.iter().map(|w| Box::pin(w.notified())).collect();
        for w in waits.iter_mut() {
            w.as_mut().enable();
        }
        let woken = |waits: &mut Vec<std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>>>| {
            use std::future::Future;
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            waits
                .iter_mut()
                .map(|w| w.as_mut().poll(&mut cx).is_ready())
                .collect::<Vec<bool>>()
        };
        hub.notify(&Key::Queue("other".into()));
        assert_eq!(woken(&mut waits), [false, false, false]);
        hub.notify(&Key::Queue("q".into()));
        assert_eq!(woken(&mut waits), [true, false, false]);
        waiters[0].more();
        assert_eq!(woken(&mut waits)[1..], [true, false]);
        hub.notify_all_queues();
        assert!(woken(&mut waits)[2]);
        drop(waits);
        drop(waiters);
        assert!(hub.is_empty(), "entries go with their last waiter");
    }

    /// A claim that was woken but went away passes the wake-up on.
    #[tokio::test]
    async fn a_wake_up_of_a_claim_that_went_away_goes_to_the_next() {
        let hub = Notifier::new();
        let (a, b) = (hub.claim_waiters("q"), hub.claim_waiters("q"));
        let mut wa = Box::pin(a.notified());
        wa.as_mut().enable();
        let wb = b.notified();
        tokio::pin!(wb);
        wb.as_mut().enable();
        hub.notify(&Key::Queue("q".into()));
        drop(wa);
        tokio::time::timeout(Duration::from_secs(1), wb)
            .await
            .expect("the second claim got the wake-up");
    }

    #[tokio::test]
    async fn other_keys_do_not_wake_and_entries_are_cleaned_up() {
        let hub = Notifier::new();
        let mut sub = hub.subscribe(Key::Queue("q".into()));
        hub.notify(&Key::Queue("other".into()));
        hub.notify(&Key::Request("q".into()));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), sub.changed())
                .await
                .is_err()
        );
        hub.notify_all_queues();
        tokio::time::timeout(Duration::from_secs(1), sub.changed())
            .await
            .unwrap();
        drop(sub);
        assert!(hub.is_empty());
    }
}
