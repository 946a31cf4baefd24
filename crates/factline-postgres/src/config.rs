//! How a PostgreSQL store is configured.

use std::time::Duration;

use factline_core::Limits;

use crate::CommitGate;

/// How to connect to PostgreSQL and size the store's writer and pool.
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// A libpq-style connection string: `postgres://user:password@host:port/db`
    /// or `host=… dbname=…`.
    pub url: String,
    /// The PostgreSQL schema factline's tables live in; created if missing.
    pub schema: String,
    /// Most connections the read pool opens. The writer and the listener
    /// have one connection each besides.
    pub pool_size: usize,
    /// What appends may hold.
    pub limits: Limits,
    /// Most events the writer puts in one group-commit transaction.
    pub max_batch_events: usize,
    /// Appends that may wait for the writer before callers are held back.
    pub queue_capacity: usize,
    /// How long opening a connection, or waiting for a pooled one, may take.
    pub connect_timeout: Duration,
    /// The server ends a writer transaction idle this long, so a stalled
    /// process cannot hold up every other process's appends.
    pub idle_in_transaction_timeout: Duration,
    /// Test hook: runs before each COMMIT; see [`CommitGate`].
    #[doc(hidden)]
    pub commit_gate: Option<CommitGate>,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("PostgresConfig")
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("limits", &self.limits)
            .field("max_batch_events", &self.max_batch_events)
            .finish_non_exhaustive()
    }
}

impl PostgresConfig {
    /// The defaults for the database at `url`, in the `factline` schema.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            schema: "factline".to_string(),
            pool_size: 16,
            limits: Limits::default(),
            max_batch_events: 20_000,
            queue_capacity: 4096,
            connect_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(60),
            commit_gate: None,
        }
    }
}
