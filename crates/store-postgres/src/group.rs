//! Group commit: concurrent submits (with or without an idempotency key),
//! and concurrent settlements, are each written together — one transaction,
//! one commit, one WAL flush for everything that arrived meanwhile — by a
//! few writer tasks that each take whatever is waiting (up to
//! [`MAX_BATCH`]), the way the embedded store's single writer does. Idle, a
//! call is written alone at once; under load the batches grow by
//! themselves. A caller is answered only after the commit of its batch.
//!
//! Settlement items were already independent of each other (each is
//! checked and applied on its own, a refused one writes nothing), so many
//! callers' items are one `request_settle_many` and each caller gets its
//! own results back. If a whole batch fails for a reason other than
//! "unavailable" (a row the database refuses), each call is retried alone,
//! so only the bad one fails.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use coatcheck_core::{HistoryEvent, Request, Ts};
use coatcheck_store::{Changed, Idempotency, Result, SettleParams, StoreError, Submitted};
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;

use crate::error::{classify, pool};
use crate::listen;
use crate::sql::{self, NewRows};
use crate::Inner;

/// The most calls one batch takes.
pub const MAX_BATCH: usize = 256;

/// Writer tasks per kind: while one writes a batch, the next one gathers.
pub const WRITERS: usize = 4;

/// A submit waiting to be written.
pub struct Submit {
    pub req: Request,
    pub events: Vec<HistoryEvent>,
    pub idem: Option<Idempotency>,
    pub done: oneshot::Sender<Result<Submitted>>,
}

/// A settlement call waiting to be applied.
pub struct Settle {
    pub items: Vec<SettleParams>,
    pub now: Ts,
    pub done: oneshot::Sender<Result<Vec<Result<Changed>>>>,
}

type Write<T> = fn(Arc<Inner>, Vec<T>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// A queue of calls and the writer tasks that drain it.
pub struct Group<T> {
    tx: std::sync::Mutex<Option<mpsc::UnboundedSender<T>>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl<T: Send + 'static> Group<T> {
    /// An empty group; [`Group::start`] starts its writers.
    pub fn new() -> Self {
        Group {
            tx: std::sync::Mutex::new(None),
            tasks: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Starts the writers, each calling `write` with a batch.
    pub fn start(&self, inner: &Arc<Inner>, write: Write<T>) {
        let (tx, rx) = mpsc::unbounded_channel::<T>();
        let rx = Arc::new(Mutex::new(rx));
        let mut tasks = Vec::with_capacity(WRITERS);
        for _ in 0..WRITERS {
            let (rx, inner) = (rx.clone(), Arc::downgrade(inner));
            tasks.push(tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { return };
                        let mut batch = vec![first];
                        while batch.len() < MAX_BATCH {
                            match rx.try_recv() {
                                Ok(p) => batch.push(p),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    let Some(inner) = inner.upgrade() else { return };
                    write(inner, batch).await;
                }
            }));
        }
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        *self.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
    }

    /// Queues a call; false if the group is closed.
    pub fn send(&self, call: T) -> bool {
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|tx| tx.send(call).is_ok())
    }

    /// Stops taking calls; waits until everything queued is written.
    pub async fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// Writes a batch of submits.
pub fn write_submits(
    inner: Arc<Inner>,
    batch: Vec<Submit>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let res = inner.insert(batch.iter()).await;
        match res {
            Ok(created) => inner.answer_submits(batch, &created).await,
            Err(e) if batch.len() > 1 && !matches!(e, StoreError::Unavailable(_)) => {
                for p in batch {
                    match inner.insert(std::iter::once(&p)).await {
                        Ok(created) => inner.answer_submits(vec![p], &created).await,
                        Err(e) => {
                            let _ = p.done.send(Err(e));
                        }
                    }
                }
            }
            Err(e) => {
                for p in batch {
                    let _ = p.done.send(Err(e.clone()));
                }
            }
        }
    })
}

/// Applies a batch of settlement calls as one.
pub fn write_settles(
    inner: Arc<Inner>,
    batch: Vec<Settle>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        if batch.len() == 1 {
            let Settle { items, now, done } = batch.into_iter().next().expect("one");
            let items = items.into_iter().map(|i| (i, now)).collect();
            let _ = done.send(inner.settle_items(items).await);
            return;
        }
        let mut items = Vec::new();
        for s in &batch {
            items.extend(s.items.iter().cloned().map(|i| (i, s.now)));
        }
        let res = inner.settle_items(items).await;
        match res {
            Ok(results) => {
                let mut results = results.into_iter();
                for s in batch {
                    let mine: Vec<_> = results.by_ref().take(s.items.len()).collect();
                    let _ = s.done.send(Ok(mine));
                }
            }
            Err(e) if !matches!(e, StoreError::Unavailable(_)) => {
                for s in batch {
                    let items = s.items.into_iter().map(|i| (i, s.now)).collect();
                    let _ = s.done.send(inner.settle_items(items).await);
                }
            }
            Err(e) => {
                for s in batch {
                    let _ = s.done.send(Err(e.clone()));
                }
            }
        }
    })
}

impl Inner {
    /// Inserts the batch in one statement; the ids it created (a submit
    /// whose idempotency key was taken created nothing).
    async fn insert<'a>(
        &self,
        batch: impl Iterator<Item = &'a Submit>,
    ) -> Result<std::collections::HashSet<String>> {
        let mut rows = NewRows::default();
        for p in batch {
            rows.push(&p.req, &p.events, p.idem.as_ref())?;
        }
        rows.seal();
        let client = self.pool.get().await.map_err(pool)?;
        let stmt = client
            .prepare_cached(sql::INSERT_REQUESTS)
            .await
            .map_err(classify)?;
        let created = client
            .query(&stmt, &rows.params())
            .await
            .map_err(classify)?;
        created
            .iter()
            .map(|r| r.try_get::<_, String>(0).map_err(classify))
            .collect()
    }

    /// Answers a written batch: created, or — its key was taken — the
    /// request that took it (a replay), or a mismatch.
    async fn answer_submits(
        &self,
        batch: Vec<Submit>,
        created: &std::collections::HashSet<String>,
    ) {
        let (new, taken): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|p| created.contains(&p.req.id));
        self.announce(new.iter().map(|p| listen::entry(&p.req)).collect())
            .await;
        for p in new {
            let _ = p.done.send(Ok(Submitted::Created(p.req)));
        }
        for p in taken {
            let res = self.replay(&p).await;
            let _ = p.done.send(res);
        }
    }

    /// A submit whose idempotency key was taken: the request that has it.
    async fn replay(&self, p: &Submit) -> Result<Submitted> {
        let Some(idem) = &p.idem else {
            return Err(StoreError::Internal(format!(
                "the submit of {} was not written",
                p.req.id
            )));
        };
        let client = self.pool.get().await.map_err(pool)?;
        let rows = client
            .query(sql::SELECT_IDEMPOTENCY, &[&p.req.tenant, &idem.key])
            .await
            .map_err(classify)?;
        let row = rows.first().ok_or_else(|| {
            StoreError::Unavailable("an idempotency key changed meanwhile".into())
        })?;
        let id: String = row.try_get(0).map_err(classify)?;
        let hash: String = row.try_get(1).map_err(classify)?;
        drop(client);
        if hash != idem.body_hash {
            return Err(StoreError::IdempotencyMismatch);
        }
        Ok(Submitted::Replayed(self.get(&id).await?))
    }
}
