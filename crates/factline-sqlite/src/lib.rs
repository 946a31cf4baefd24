//! factline's embedded default backend: the whole event store in one SQLite
//! file (WAL mode, durable by default).
//!
//! One writer thread owns the only write connection and group-commits:
//! appends queue on a channel, and the writer commits everything queued in one
//! transaction (one fsync); each append is decided before it writes anything,
//! so it still succeeds or fails alone. Reads run on a small pool of read
//! connections, which WAL mode lets proceed while the writer commits.

#![warn(missing_docs)]

pub mod baseline;
mod checkpoint;
mod commands;
mod config;
mod head;
mod inline;
pub mod migrate;
mod reader;
mod schema;
pub mod sql;
mod writer;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use chrono::Utc;
use factline_core::backend::retention_cutoff;
use factline_core::backend::writer_queue::{submit_append, submit_command, AppendJob};
use factline_core::{
    AppendResult, Appended, CommandKey, CommandRecord, EventData, EventStore, ExpectedVersion,
    JsonText, ReadStream, RecordedEvent, Snapshot, StorageError, StoreError, StreamFilter,
    StreamId, Subscription, Tally,
};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, watch};

pub use config::{SqliteConfig, Synchronous};
pub use inline::InlineProjection;
pub use schema::SCHEMA_VERSION;

/// Counters of the writer's work, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Write transactions committed (or attempted).
    pub transactions: u64,
    /// Append calls handled.
    pub appends: u64,
}

/// The embedded store: one SQLite file, one writer thread that commits appends
/// in groups, a pool of readers.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

struct Shared {
    config: SqliteConfig,
    jobs: mpsc::Sender<AppendJob>,
    head: Arc<watch::Sender<u64>>,
    stats: Arc<writer::Counters>,
    readers: reader::Pool,
    /// Writes besides appends (snapshots, purges): their own connections,
    /// which wait for the writer thread's lock like another process would.
    side_writers: reader::Pool,
    /// Whether the head poll runs (started by the first subscription).
    head_poll: OnceLock<bool>,
}

pub(crate) use sql::{db_error, is_transient};

pub(crate) fn open_connection(
    config: &SqliteConfig,
    read_only: bool,
) -> Result<Connection, StoreError> {
    // Readers open read-write but set `query_only`: a read-only open cannot
    // always attach to an existing WAL's shared memory.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let open_err = db_error("opening the database");
    let conn = Connection::open_with_flags(&config.path, flags).map_err(&open_err)?;
    conn.busy_timeout(config.busy_timeout).map_err(&open_err)?;
    if read_only {
        conn.pragma_update(None, "query_only", "ON")
            .map_err(&open_err)?;
    } else {
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(&open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StorageError::new(format!(
                "{} could not be switched to WAL mode (it reports {mode})",
                config.path.display()
            ))
            .into());
        }
        // The checkpoint thread copies the WAL into the file, so no commit
        // pays for it.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(&open_err)?;
    }
    conn.pragma_update(None, "synchronous", config.synchronous.pragma_value())
        .map_err(&open_err)?;
    // Temporary b-trees (sorts) stay off the disk.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(&open_err)?;
    // 32 MiB of page cache keeps the indexes' hot pages in memory.
    conn.pragma_update(None, "cache_size", -32_768)
        .map_err(&open_err)?;
    // With the bundled build's STAT4, binding a value to an indexed column
    // expires the statement and forces a re-prepare on every execution; a
    // stable query plan keeps the cached statements valid.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .map_err(&open_err)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` with default settings.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(SqliteConfig::new(path.as_ref()))
    }

    /// Opens the store, applies pending migrations and starts the writer and
    /// checkpoint threads (plain OS threads: opening needs no runtime, the
    /// async methods need a tokio runtime).
    pub fn open_with(config: SqliteConfig) -> Result<Self, StoreError> {
        Self::open_with_inline(config, Vec::new())
    }

    /// Opens the store with projections the writer updates in each append's
    /// own transaction (C6); see [`InlineProjection`]. Every process that
    /// appends to the file should open it with the same ones, or its
    /// appends are applied only when one of those appends next.
    pub fn open_with_inline(
        config: SqliteConfig,
        mut inline: Vec<Box<dyn InlineProjection>>,
    ) -> Result<Self, StoreError> {
        factline_core::backend::create_private_file(&config.path)
            .map_err(|e| StorageError::new(format!("creating {}: {e}", config.path.display())))?;
        let mut conn = open_connection(&config, false)?;
        schema::migrate(&mut conn)?;
        // Before open returns, so reads of the models are current at once.
        writer::catch_up_inline(&mut conn, &mut inline);
        let head_now = reader::head_position(&conn)?;
        let head = Arc::new(watch::channel(head_now).0);
        let stats = Arc::new(writer::Counters::default());
        let (jobs, queue) = mpsc::channel(config.queue_capacity.max(1));
        let checkpoints = checkpoint::spawn(&config)?;
        writer::spawn(
            writer::Writer {
                conn,
                checkpoints,
                head: head.clone(),
                counters: stats.clone(),
                max_batch_events: config.max_batch_events.max(1),
                limits: config.limits,
                inline,
            },
            queue,
        )?;
        let readers = reader::Pool::new(config.clone(), true);
        let side_writers = reader::Pool::new(config.clone(), false);
        Ok(SqliteStore {
            shared: Arc::new(Shared {
                config,
                jobs,
                head,
                stats,
                readers,
                side_writers,
                head_poll: OnceLock::new(),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.config.path
    }

    /// How many reads this handle has run (every `read_*`, the head, a
    /// subscription's page), for tests and metrics.
    pub fn reads(&self) -> u64 {
        self.shared.readers.runs()
    }

    /// The writer's counts so far.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            transactions: self.shared.stats.transactions.load(Ordering::Relaxed),
            appends: self.shared.stats.appends.load(Ordering::Relaxed),
        }
    }
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        submit_append(
            &self.shared.jobs,
            &self.shared.config.limits,
            stream_id,
            expected,
            events,
            "SQLite writer thread",
        )
        .await
    }

    async fn append_command(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        command: &CommandKey,
    ) -> Result<Appended, StoreError> {
        submit_command(
            &self.shared.jobs,
            &self.shared.config.limits,
            stream_id,
            expected,
            events,
            command,
            "SQLite writer thread",
        )
        .await
    }

    async fn find_command(&self, key: &str) -> Result<Option<CommandRecord>, StoreError> {
        let key = key.to_owned();
        let retention = self.shared.config.limits.command_retention;
        let found = self
            .shared
            .readers
            .run(move |conn| {
                commands::find(conn, &key).map_err(db_error("looking up a command key"))?
            })
            .await?;
        Ok(found.filter(|record| record.is_live(Utc::now(), retention)))
    }

    async fn purge_commands(&self) -> Result<u64, StoreError> {
        let cutoff = retention_cutoff(Utc::now(), self.shared.config.limits.command_retention);
        self.shared
            .side_writers
            .run(move |conn| {
                commands::purge(conn, cutoff).map_err(db_error("purging command keys"))
            })
            .await
    }

    async fn save_snapshot(
        &self,
        stream_id: &StreamId,
        version: u64,
        snapshot_version: u32,
        data: &JsonText,
    ) -> Result<(), StoreError> {
        let (stream_id, data) = (stream_id.clone(), data.clone());
        self.shared
            .side_writers
            .run(move |conn| {
                commands::save_snapshot(conn, &stream_id, version, snapshot_version, &data)
            })
            .await
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let stream_id = stream_id.clone();
        self.shared
            .readers
            .run(move |conn| commands::load_snapshot(conn, &stream_id))
            .await
    }

    async fn read_stream(
        &self,
        stream_id: &StreamId,
        options: ReadStream,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_stream_bounded(stream_id, options, usize::MAX)
            .await
    }

    async fn read_stream_bounded(
        &self,
        stream_id: &StreamId,
        options: ReadStream,
        max_bytes: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let stream_id = stream_id.clone();
        self.shared
            .readers
            .run(move |conn| reader::read_stream(conn, &stream_id, options, max_bytes))
            .await
    }

    async fn read_filtered(
        &self,
        filter: &StreamFilter,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_filtered_bounded(filter, from, limit, usize::MAX)
            .await
    }

    async fn read_filtered_bounded(
        &self,
        filter: &StreamFilter,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let filter = filter.clone();
        self.shared
            .readers
            .run(move |conn| reader::read_filtered(conn, &filter, from, limit, max_bytes))
            .await
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        self.shared.readers.run(reader::head_position).await
    }

    async fn tally(&self, after: u64, max_events: u64) -> Result<Tally, StoreError> {
        self.shared
            .readers
            .run(move |conn| reader::tally(conn, after, max_events))
            .await
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }

    fn subscribe(&self, filter: StreamFilter, from: u64) -> Subscription {
        // Other processes' commits arrive through the one head poll; only
        // if it cannot start does each subscription poll for itself.
        let polled = *self.shared.head_poll.get_or_init(|| {
            head::spawn(&self.shared.config, &self.shared.head)
                .inspect_err(|e| tracing::warn!(error = %e, "subscriptions poll one by one"))
                .is_ok()
        });
        let fallback = (!polled).then_some(self.shared.config.fallback_poll);
        Subscription::new(Arc::new(self.clone()), filter, from, fallback)
    }
}
