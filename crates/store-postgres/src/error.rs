//! Classifying PostgreSQL failures into the kinds the engine acts on.
//!
//! Anything that says "the database cannot be reached, is restarting, is
//! overloaded, or made us wait too long" is [`StoreError::Unavailable`]
//! (HTTP 503 with `Retry-After`): the connection was refused, closed or
//! timed out, the pool had no connection within its bounded wait, or the
//! server answered with a connection, resource, shutdown, timeout or
//! concurrency SQLSTATE. Everything else — a constraint we did not expect,
//! a type mismatch — is a bug: [`StoreError::Internal`].

use coatcheck_store::StoreError;
use deadpool_postgres::PoolError;

/// Classifies a tokio-postgres error.
pub fn classify(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return if unavailable_code(code) {
            StoreError::Unavailable(format!("{} ({code})", db.message()))
        } else {
            StoreError::Internal(format!("{} ({code})", db.message()))
        };
    }
    if e.is_closed() || has_io_source(&e) || e.to_string().starts_with("timeout") {
        return StoreError::Unavailable(e.to_string());
    }
    StoreError::Internal(e.to_string())
}

/// Classifies a failure to get a pooled connection.
pub fn pool(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => classify(e),
        PoolError::Timeout(_) => {
            StoreError::Unavailable("no database connection within the pool's wait".into())
        }
        PoolError::Closed => StoreError::Unavailable("the store is closed".into()),
        other => StoreError::Internal(other.to_string()),
    }
}

/// SQLSTATEs that mean "try again later".
fn unavailable_code(code: &str) -> bool {
    code.starts_with("08")          // connection exception
        || code.starts_with("53")   // insufficient resources (too many connections, disk full)
        || code.starts_with("57P")  // admin/crash shutdown, cannot connect now
        || code.starts_with("58")   // system error (I/O)
        || matches!(
            code,
            "57014"     // query_canceled (statement_timeout)
            | "55P03"   // lock_not_available (lock_timeout)
            | "40001"   // serialization_failure
            | "40P01"   // deadlock_detected
            | "25P03"   // idle_in_transaction_session_timeout
            | "25006"   // read_only_sql_transaction (a standby, during fail-over)
        )
}

fn has_io_source(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A JSON (de)serialization failure: stored data we cannot read is a bug.
pub fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_codes_are_unavailable() {
        for code in [
            "08006", "53300", "57P01", "57P03", "57014", "40P01", "55P03",
        ] {
            assert!(unavailable_code(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02"] {
            assert!(!unavailable_code(code), "{code}");
        }
    }
}
