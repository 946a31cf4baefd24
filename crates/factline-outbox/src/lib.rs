//! The transactional outbox (O1–O6).
//!
//! Publications say which events leave factline and on which subject. Once
//! one exists, a trigger on the events table writes an outbox record for
//! every matching event inside the append's own transaction, so a write
//! that rolls back leaves no record and a committed one always has one,
//! whichever process appended it. A [`Relay`] publishes pending records to
//! a [`Sink`] (NATS JetStream, a webhook, stdout or a file) in per-stream
//! order and marks them published only once the sink acknowledged them.
//! Records are spread over [`LANES`] lanes by stream; each relay process
//! holds a share of the lanes through leases, so several relays can run at
//! once without two of them publishing one stream. [`inbox`] is the
//! consumer side: it records processed event ids so redeliveries are
//! ignored.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//!
//! use factline_core::{EventData, EventStore, ExpectedVersion, StreamId};
//! use factline_outbox::{FileSink, OutboxDb, Publication, Relay, RelayConfig, SqliteOutbox};
//! use factline_sqlite::SqliteStore;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("factline.db");
//! let store = SqliteStore::open(&path).unwrap();
//! let outbox = Arc::new(SqliteOutbox::open(&path).unwrap());
//! // From now on every Invoice event gets an outbox record in its append's
//! // own transaction, whichever process appends it.
//! outbox.add_publication(Publication::category("Invoice")).await.unwrap();
//! let issued = EventData::new("InvoiceIssued", serde_json::json!({ "cents": 4200 }));
//! let invoice = StreamId::new("Invoice-1").unwrap();
//! store.append(&invoice, ExpectedVersion::NoStream, vec![issued]).await.unwrap();
//!
//! let out = dir.path().join("invoices.jsonl");
//! let sink = Arc::new(FileSink::open(&out).await.unwrap());
//! let relay = Relay::new(outbox, sink, RelayConfig::default());
//! assert_eq!(relay.drain().await.unwrap(), 1);
//! let published = std::fs::read_to_string(&out).unwrap();
//! assert!(published.contains("InvoiceIssued"));
//! # });
//! ```

// The shared helpers serve the backends; a build with neither uses only
// the contract.
#![warn(missing_docs)]

use factline_core::StorageError;

#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
mod db;
pub mod inbox;
mod message;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "postgres")]
mod postgres;
mod publication;
mod relay;
mod sink;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "webhook")]
mod webhook;

pub use db::{Mark, OutboxDb, OutboxStatus, ParkedRecord, PendingRecord};
pub use message::Message;
#[cfg(feature = "nats")]
pub use nats::{NatsSink, NatsSinkConfig};
#[cfg(feature = "postgres")]
pub use postgres::PostgresOutbox;
pub use publication::{Publication, DEFAULT_KEY, DEFAULT_SUBJECT};
pub use relay::{Relay, RelayConfig, RelayStats, RelayStatsSnapshot, Round, WAVES_IN_FLIGHT};
pub use sink::{FileSink, Sink, SinkError, StdoutSink};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteOutbox;
#[cfg(feature = "webhook")]
pub use webhook::WebhookSink;

/// Lanes the outbox is split into by stream (`stream_no % LANES`): the
/// unit a relay holds a lease on, so at most this many relays share work.
pub const LANES: i64 = 32;

/// Why an outbox operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The caller's input: a bad publication, a bad sink address.
    #[error("{0}")]
    InvalidInput(String),
    /// The database holding the outbox failed; see
    /// [`StorageError::is_retryable`].
    #[error("outbox database: {0}")]
    Database(#[from] StorageError),
    /// The sink could not be set up.
    #[error("sink: {0}")]
    Sink(#[from] SinkError),
}

impl OutboxError {
    /// A failure of the outbox's own machinery (a task, a cache), not of
    /// the caller's input.
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        OutboxError::Database(StorageError::new(message))
    }

    /// Whether the same operation may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            OutboxError::Database(e) => e.is_retryable(),
            OutboxError::Sink(e) => e.is_retryable(),
            _ => false,
        }
    }
}

#[cfg(feature = "sqlite")]
impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        OutboxError::Database(factline_sqlite::sql::storage_error(
            "the outbox's tables",
            e,
        ))
    }
}

#[cfg(feature = "postgres")]
impl From<tokio_postgres::Error> for OutboxError {
    fn from(e: tokio_postgres::Error) -> Self {
        OutboxError::Database(factline_postgres::sql::storage_error(
            "the outbox's tables",
            e,
        ))
    }
}
