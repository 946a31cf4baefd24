//! factline's projection engine (P1, P3): read models computed from the
//! event log, each with a checkpoint (the last global position applied)
//! written in the same transaction as the read model's rows. After a crash
//! a projection resumes from its checkpoint: no event is lost and none is
//! applied twice.
//!
//! A projection is written for its read model's database: a
//! [`SqliteProjection`] writes through a `rusqlite::Transaction`, a
//! [`PostgresProjection`] through a `tokio_postgres::Transaction`. The read
//! model may live in the same database as the events or in another one of
//! the same kind; events come from any [`EventStore`](factline_core::EventStore).
//! A [`Runner`] follows `$all` from the checkpoint and hands the projection
//! batches (500 events or 100 ms, whichever comes first, by default).
//!
//! A [`SqlProjection`] is written once for both databases:
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//!
//! use factline_core::{EventData, EventStore, ExpectedVersion, RecordedEvent, StreamId};
//! use factline_projections::{
//!     ApplyError, Portable, Runner, SqlProjection, SqlValue, SqliteSink, Statement, Tables,
//! };
//! use factline_sqlite::SqliteStore;
//!
//! /// What each invoice was paid.
//! struct PaidInvoices;
//!
//! impl SqlProjection for PaidInvoices {
//!     fn name(&self) -> &str {
//!         "paid_invoices"
//!     }
//!     fn tables(&self) -> &[&str] {
//!         &["paid"]
//!     }
//!     fn create_tables(&self, tables: &Tables) -> Vec<String> {
//!         let paid = tables.get("paid");
//!         vec![format!("CREATE TABLE IF NOT EXISTS {paid} (invoice TEXT PRIMARY KEY, cents BIGINT NOT NULL)")]
//!     }
//!     fn statements(&mut self, tables: &Tables, event: &RecordedEvent) -> Result<Vec<Statement>, ApplyError> {
//!         if event.event_type != "InvoicePaid" {
//!             return Ok(Vec::new());
//!         }
//!         let data = event.data.to_value().map_err(|e| ApplyError::new(e.to_string()))?;
//!         let cents = data["cents"].as_i64().ok_or_else(|| ApplyError::new("no cents"))?;
//!         Ok(vec![Statement::new(
//!             format!("INSERT INTO {} (invoice, cents) VALUES ($1, $2)", tables.get("paid")),
//!             vec![SqlValue::Text(event.stream_id.to_string()), SqlValue::Int(cents)],
//!         )])
//!     }
//! }
//!
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("invoices.db");
//! let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(&path).unwrap());
//! let paid = EventData::new("InvoicePaid", serde_json::json!({ "cents": 4200 }));
//! let invoice = StreamId::new("Invoice-1").unwrap();
//! store.append(&invoice, ExpectedVersion::NoStream, vec![paid]).await.unwrap();
//!
//! // The read model lives beside the events; its checkpoint commits with its rows.
//! let sink = SqliteSink::open(&path, Portable::new(PaidInvoices)).unwrap();
//! let mut runner = Runner::new(store.clone(), sink);
//! runner.catch_up(store.head_position().await.unwrap()).await.unwrap();
//!
//! // Readers query the view named after the logical table.
//! let conn = rusqlite::Connection::open(&path).unwrap();
//! let cents: i64 = conn
//!     .query_row("SELECT cents FROM paid WHERE invoice = 'Invoice-1'", [], |r| r.get(0))
//!     .unwrap();
//! assert_eq!(cents, 4200);
//! # });
//! ```

#![warn(missing_docs)]
// A build without either backend keeps the shared engine, whose helpers
// only the backends call.
#![cfg_attr(
    not(any(feature = "sqlite", feature = "postgres")),
    allow(dead_code, unused_imports)
)]

use factline_core::StorageError;

mod admin;
mod diff;
mod parking;
mod partitioned;
mod portable;
#[cfg(feature = "postgres")]
pub mod postgres;
mod reactor;
mod runner;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod status;
mod tables;

pub use admin::{ProjectionInfo, VersionInfo};
pub use diff::{DiffReport, TableDiff};
pub use parking::{ParkedEvent, Parking, PoisonPolicy, RetryPolicy, RetryReport};
pub use partitioned::Partitioned;
pub use portable::{Dialect, Expected, Portable, SqlProjection, SqlValue, Statement};
#[cfg(feature = "postgres")]
pub use postgres::{
    PostgresAdmin, PostgresCheckpoints, PostgresInline, PostgresProjection, PostgresSink,
};
pub use reactor::{effect_key, Checkpoints, Reactor, ReactorRunner};
pub use runner::{BatchPolicy, Runner, RunnerStats, Sink, VersionedSink};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteAdmin, SqliteCheckpoints, SqliteInline, SqliteProjection, SqliteSink};
pub use status::{Answer, Freshness, Lag, NotYet, OnTimeout, Progress, ProjectionStatus};
pub use tables::{is_plain_name, partition_of, Mode, Partition, Tables};

/// Why a projection stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The projection's own code refused an event; the batch was rolled
    /// back with its checkpoint.
    #[error("projection {projection} failed on the event at position {position}: {message}")]
    Apply {
        /// The projection's name.
        projection: String,
        /// The event's global position.
        position: u64,
        /// What the projection said.
        message: String,
    },
    /// The read model's database failed; the batch was rolled back. The
    /// source says whether trying again may succeed
    /// ([`StorageError::is_retryable`]).
    #[error("projection {projection}: {source}")]
    ReadModel {
        /// The projection's name.
        projection: String,
        /// What failed, with the driver's error.
        #[source]
        source: StorageError,
    },
    /// The request does not fit the projection: a bad name, partition count
    /// or version. Running it again gives the same answer.
    #[error("projection {projection}: {message}")]
    Invalid {
        /// The projection's name.
        projection: String,
        /// What is wrong.
        message: String,
    },
    /// The database aborted the batch for reasons of its own (a deadlock
    /// between partitions, a serialization failure) even after retries;
    /// running it again may succeed.
    #[error("projection {projection}: {message} (the database aborted the batch; retried)")]
    Transient {
        /// The projection's name.
        projection: String,
        /// What the database said.
        message: String,
    },
    /// This version is not the active one: another was swapped in, so it
    /// stops instead of writing.
    #[error(
        "version {version} of projection {projection} is not the active one (version {active} is)"
    )]
    NotActive {
        /// The projection's name.
        projection: String,
        /// The version that stopped.
        version: u32,
        /// The version that is active.
        active: u32,
    },
    /// Another runner of the same projection (version, partition) moved
    /// the checkpoint since this one read it: this batch was rolled back
    /// instead of applying events twice. Runners of one projection in
    /// several processes take a lease so this does not happen.
    #[error("another runner of projection {projection} moved its checkpoint to {found} (this one expected {expected}); nothing of this batch was applied")]
    Contended {
        /// The projection's name.
        projection: String,
        /// The checkpoint this runner read.
        expected: u64,
        /// The checkpoint it found when committing.
        found: u64,
    },
    /// An operator paused the projection: its batches do not commit until
    /// it is resumed.
    #[error("projection {projection} is paused")]
    Paused {
        /// The projection's name.
        projection: String,
    },
    #[error(transparent)]
    /// Reading the event store failed.
    Store(#[from] factline_core::StoreError),
}

impl ProjectionError {
    /// A failure of the read model's database (or of the machinery
    /// around it) for `projection`.
    pub fn read_model(projection: impl Into<String>, source: StorageError) -> Self {
        ProjectionError::ReadModel {
            projection: projection.into(),
            source,
        }
    }

    /// A request that does not fit `projection`.
    pub fn invalid(projection: impl Into<String>, message: impl Into<String>) -> Self {
        ProjectionError::Invalid {
            projection: projection.into(),
            message: message.into(),
        }
    }

    /// Whether running the same work again may succeed: a database that
    /// was busy, unreachable or aborted the batch.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProjectionError::ReadModel { source, .. } => source.is_retryable(),
            ProjectionError::Transient { .. } => true,
            ProjectionError::Store(factline_core::StoreError::Storage(e)) => e.is_retryable(),
            _ => false,
        }
    }
}

/// What a projection's `apply` returns when it cannot apply an event.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApplyError {
    message: String,
    /// The database gave up on the transaction for reasons of its own (a
    /// deadlock with another partition, a serialization failure): the same
    /// batch may succeed when run again.
    transient: bool,
}

impl ApplyError {
    /// A refusal by the projection's code: the batch is rolled back and the event may be parked.
    pub fn new(message: impl Into<String>) -> Self {
        ApplyError {
            message: message.into(),
            transient: false,
        }
    }

    /// What the projection said.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// What the projection said, owned.
    pub fn into_message(self) -> String {
        self.message
    }

    /// Whether the database aborted the transaction for reasons of its own, so
    /// the same batch may succeed when run again.
    pub fn is_transient(&self) -> bool {
        self.transient
    }
}

#[cfg(feature = "sqlite")]
impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        ApplyError::new(e.to_string())
    }
}

#[cfg(feature = "postgres")]
impl From<tokio_postgres::Error> for ApplyError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApplyError {
            transient: postgres::is_transient(&e),
            message: postgres::describe(&e),
        }
    }
}

/// Projection names go into checkpoint rows and log lines: short and plain.
/// Whether `name` may name a projection: 1 to 100 letters, digits, `_`,
/// `-` or `.`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

pub(crate) fn validate_name(name: &str) -> Result<(), ProjectionError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(ProjectionError::invalid(
            name.chars().take(100).collect::<String>(),
            "a projection name is 1 to 100 letters, digits, '_', '-' or '.'",
        ))
    }
}

/// The SQL of an upsert that wins only with a newer position; `placeholder`
/// spells parameter n (1-based) in the database's dialect. Parameters are
/// the key values, then the other values, then the position.
pub(crate) fn upsert_sql<V>(
    table: &str,
    key: &[(&str, V)],
    values: &[(&str, V)],
    placeholder: impl Fn(usize) -> String,
) -> Result<String, ApplyError> {
    let plain = |name: &str| {
        !name.is_empty()
            && name.len() <= 63
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit())
    };
    let table_ok = table.split('.').count() <= 2 && table.split('.').all(plain);
    let bad = key
        .iter()
        .chain(values)
        .map(|(c, _)| *c)
        .find(|c| !plain(c) || *c == "last_position");
    if !table_ok || key.is_empty() {
        return Err(ApplyError::new(format!(
            "upsert into {table:?}: a plain table name and at least one key column are needed"
        )));
    }
    if let Some(column) = bad {
        return Err(ApplyError::new(format!(
            "upsert into {table}: {column:?} is not a plain column name (or is last_position)"
        )));
    }
    let columns: Vec<&str> = key.iter().chain(values).map(|(c, _)| *c).collect();
    let marks: Vec<String> = (1..=columns.len() + 1).map(&placeholder).collect();
    let updates: Vec<String> = values
        .iter()
        .map(|(c, _)| format!("{c} = excluded.{c}"))
        .chain(["last_position = excluded.last_position".to_owned()])
        .collect();
    let key_columns: Vec<&str> = key.iter().map(|(c, _)| *c).collect();
    // The target row is named by the table's last part (PostgreSQL does
    // not accept a schema-qualified name there).
    let row = table.rsplit('.').next().unwrap_or(table);
    Ok(format!(
        "INSERT INTO {table} ({}, last_position) VALUES ({})
         ON CONFLICT ({}) DO UPDATE SET {}
         WHERE excluded.last_position > {row}.last_position",
        columns.join(", "),
        marks.join(", "),
        key_columns.join(", "),
        updates.join(", "),
    ))
}
