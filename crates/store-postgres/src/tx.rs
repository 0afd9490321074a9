//! A transaction on a pooled connection, written for few round trips.
//!
//! `BEGIN` is not sent on its own: it goes out together with the first
//! query (tokio-postgres pipelines requests issued together), and `COMMIT`
//! goes out together with every write of the transaction. A transition is
//! therefore two round trips: "begin + lock and read the rows", then
//! "write everything + commit".
//!
//! A `Tx` dropped while open (a panic, a bug) takes its connection out of
//! the pool and closes it, so PostgreSQL rolls the transaction back and no
//! later caller can inherit it. Store calls run on their own tasks, so a
//! caller that goes away (an HTTP client hanging up) does not cut a
//! transaction short.

use deadpool_postgres::{Object, Pool};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

use coatcheck_store::{Result, StoreError};

use crate::error::{classify, pool};

/// One statement of a transaction's write phase.
pub type Write<'a> = (&'a str, Vec<&'a (dyn ToSql + Sync)>);

/// An open (or about to open) transaction.
pub struct Tx {
    client: Option<Object>,
    begun: bool,
    begin: &'static str,
}

/// Opens a transaction whose commit waits for the WAL flush.
const BEGIN: &str = "BEGIN";

/// Opens a transaction whose commit does not wait for the WAL flush: for
/// work that a crash may safely undo (a claim — the request is simply still
/// queued and its worker's settlement is refused; lease and deadline
/// expiry — the sweep runs again). What a caller is promised durably
/// (submits, settlements, cancels, redrives) never uses it.
const BEGIN_RELAXED: &str = "BEGIN; SET LOCAL synchronous_commit TO off";

/// Makes a relaxed transaction's commit wait for the WAL flush after all
/// (it produced something promised durably: a reply, a fallback request).
pub const DURABLE_COMMIT: &str = "SET LOCAL synchronous_commit TO on";

impl Tx {
    /// Takes a pooled connection (waiting at most the pool's bounded wait).
    pub async fn start(p: &Pool) -> Result<Tx> {
        let client = p.get().await.map_err(pool)?;
        Ok(Tx {
            client: Some(client),
            begun: false,
            begin: BEGIN,
        })
    }

    /// Like [`Tx::start`], committing without waiting for the WAL flush
    /// (see [`BEGIN_RELAXED`]).
    pub async fn start_relaxed(p: &Pool) -> Result<Tx> {
        let mut tx = Self::start(p).await?;
        tx.begin = BEGIN_RELAXED;
        Ok(tx)
    }

    /// Whether its commit skips the WAL flush wait.
    pub fn is_relaxed(&self) -> bool {
        self.begin == BEGIN_RELAXED
    }

    fn client(&self) -> &Object {
        self.client.as_ref().expect("a live transaction")
    }

    async fn prepare(&self, sql: &str) -> Result<Statement> {
        self.client().prepare_cached(sql).await.map_err(classify)
    }

    /// Runs a query in the transaction (opening it with this query).
    pub async fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let stmt = self.prepare(sql).await?;
        let client = self.client();
        if self.begun {
            return client.query(&stmt, params).await.map_err(classify);
        }
        let (begin, rows) = tokio::join!(
            client.batch_execute(self.begin),
            client.query(&stmt, params)
        );
        self.begun = true;
        begin.map_err(classify)?;
        rows.map_err(classify)
    }

    /// Runs one statement with each of several parameter lists, pipelined
    /// (one round trip for all).
    pub async fn query_many(
        &mut self,
        sql: &str,
        params: &[Vec<&(dyn ToSql + Sync)>],
    ) -> Result<Vec<Vec<Row>>> {
        let stmt = self.prepare(sql).await?;
        let client = self.client();
        let begin = async {
            if self.begun {
                Ok(())
            } else {
                client.batch_execute(self.begin).await
            }
        };
        let queries = futures::future::join_all(params.iter().map(|p| client.query(&stmt, p)));
        let (begin, results) = tokio::join!(begin, queries);
        self.begun = true;
        begin.map_err(classify)?;
        results.into_iter().map(|r| r.map_err(classify)).collect()
    }

    /// Runs every write, then commits, all in one round trip. Answers the
    /// number of rows each write touched. On any failure nothing is
    /// committed (PostgreSQL turns the `COMMIT` of a failed transaction
    /// into a rollback).
    pub async fn commit(mut self, writes: &[Write<'_>]) -> Result<Vec<u64>> {
        let mut stmts = Vec::with_capacity(writes.len());
        for (sql, _) in writes {
            stmts.push(self.prepare(sql).await?);
        }
        let client = self.client();
        let begin = async {
            if self.begun {
                Ok(())
            } else {
                client.batch_execute(self.begin).await
            }
        };
        let execs = futures::future::join_all(
            stmts
                .iter()
                .zip(writes)
                .map(|(stmt, (_, params))| client.execute(stmt, params)),
        );
        let (begin, results, commit) = tokio::join!(begin, execs, client.batch_execute("COMMIT"));
        let outcome = (|| {
            begin.map_err(classify)?;
            let counts = results
                .into_iter()
                .map(|r| r.map_err(classify))
                .collect::<Result<Vec<u64>>>()?;
            commit.map_err(classify)?;
            Ok(counts)
        })();
        if outcome.is_ok() || self.client().is_closed() {
            self.begun = false;
        } else {
            // A failed write makes PostgreSQL answer the COMMIT with a
            // rollback; make sure the connection is clean either way.
            self.rollback_inner().await;
        }
        outcome
    }

    /// Rolls back (if anything was begun) and returns the connection.
    pub async fn rollback(mut self) {
        self.rollback_inner().await;
    }

    async fn rollback_inner(&mut self) {
        // If the rollback fails, Drop discards the connection.
        if self.begun && self.client().batch_execute("ROLLBACK").await.is_ok() {
            self.begun = false;
        }
    }

    /// Finishes a transaction whose work had no writes: rolls back (the
    /// locks go) and passes the result through.
    pub async fn end<T>(self, res: Result<T>) -> Result<T> {
        self.rollback().await;
        res
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if self.begun {
            if let Some(client) = self.client.take() {
                // Out of the pool and closed: the server rolls back.
                drop(Object::take(client));
            }
        }
    }
}

/// The error of a store that was closed.
pub fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}
