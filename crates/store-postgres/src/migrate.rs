//! Numbered migrations (`migrations/0001_init.sql`, …), embedded in the
//! binary and applied at start, all in one transaction under a
//! transaction-scoped advisory lock keyed by the schema: ten nodes starting
//! at once queue on the lock, the first applies what is missing, the others
//! find it applied. `schema_migrations` records each version with a
//! checksum of its text; an applied migration is never edited (a changed
//! checksum is reported), and a database migrated by a newer coatcheck is
//! refused rather than misread.

use tokio_postgres::Client;

use crate::config::PgOptions;
use crate::sql::{self, MIGRATIONS};

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database answered with an error (or could not be reached).
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    /// The schema is newer than this binary.
    #[error(
        "the database has schema version {found}, newer than this coatcheck knows ({known}); use a newer coatcheck"
    )]
    TooNew {
        /// The highest applied version.
        found: i32,
        /// The highest version this binary has.
        known: i32,
    },
}

/// FNV-1a, 64 bits: a stable hash for lock keys and checksums.
pub fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The advisory lock key of a schema's migrations.
pub fn lock_key(schema: &str) -> i64 {
    fnv(&format!("coatcheck:migrate:{schema}")) as i64
}

/// Applies every missing migration; answers how many it applied.
pub async fn run(client: &Client, opts: &PgOptions) -> Result<usize, MigrateError> {
    client.batch_execute("BEGIN").await?;
    let res = apply(client, opts).await;
    match &res {
        Ok(_) => client.batch_execute("COMMIT").await?,
        Err(_) => {
            let _ = client.batch_execute("ROLLBACK").await;
        }
    }
    res
}

async fn apply(client: &Client, opts: &PgOptions) -> Result<usize, MigrateError> {
    client
        .execute(sql::MIGRATE_LOCK, &[&lock_key(opts.schema_or_default())])
        .await?;
    if let Some(schema) = &opts.schema {
        // The name was validated (lower-case letters, digits, _).
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .await?;
    }
    client.batch_execute(sql::MIGRATIONS_TABLE).await?;
    let applied: Vec<(i32, String)> = client
        .query(sql::MIGRATIONS_APPLIED, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if let Some(&(found, _)) = applied.iter().find(|(v, _)| *v > known) {
        return Err(MigrateError::TooNew { found, known });
    }
    let mut n = 0;
    for &(version, name, text) in MIGRATIONS {
        let checksum = format!("{:016x}", fnv(text));
        match applied.iter().find(|(v, _)| *v == version) {
            Some((_, c)) if *c != checksum => {
                tracing::warn!(
                    version,
                    name,
                    "an applied migration differs from this binary's (migrations must never be edited)"
                );
            }
            Some(_) => {}
            None => {
                client.batch_execute(text).await?;
                client
                    .execute(sql::MIGRATION_RECORD, &[&version, &name, &checksum])
                    .await?;
                tracing::info!(version, name, "applied a migration");
                n += 1;
            }
        }
    }
    Ok(n)
}
