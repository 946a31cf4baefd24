//! factline's PostgreSQL backend: the event store for several processes
//! sharing one database.
//!
//! - Appends go through one writer task per store, which group-commits
//!   everything queued into one transaction on its own connection.
//! - Every append transaction locks the `head` row first and holds it until
//!   COMMIT, so positions are handed out in commit order across all
//!   processes: a reader of `$all` never finds an event appear below a
//!   position it has already passed (S4). ARCHITECTURE.md has the argument.
//! - Reads use a bounded connection pool.
//! - A listener connection LISTENs for the notification every commit sends,
//!   so live subscriptions in every process wake without polling.

#![warn(missing_docs)]

pub mod baseline;
mod commands;
mod config;
mod head;
mod inline;
pub mod migrate;
mod plan;
mod reader;
mod schema;
pub mod sql;
mod writer;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use factline_core::backend::retention_cutoff;
use factline_core::backend::writer_queue::{submit_append, submit_command, AppendJob};
use factline_core::{
    AppendResult, Appended, CommandKey, CommandRecord, Direction, EventData, EventStore,
    ExpectedVersion, JsonText, Limits, ReadStream, RecordedEvent, Snapshot, StorageError,
    StoreError, StreamFilter, StreamId, Subscription, Tally,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::Row;

pub use config::PostgresConfig;
pub use inline::InlineProjection;
pub use schema::SCHEMA_VERSION;
pub use writer::CommitGate;

use commands::decode_command;
use reader::{decode_event, sql_limit, sql_u64};
use schema::Sql;
use sql::{pg_error, pool_error};

/// Counts of the writer's work, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed.
    pub transactions: u64,
    /// Appends committed.
    pub appends: u64,
    /// Transactions that took the one-round-trip path (see ARCHITECTURE.md).
    pub fast_transactions: u64,
}

/// A handle to a PostgreSQL event store; clones share one writer, pool and
/// listener, which stop when the last clone is dropped.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    sql: Arc<Sql>,
    pool: Pool,
    queue: mpsc::Sender<AppendJob>,
    head: Arc<watch::Sender<u64>>,
    counters: Arc<writer::Counters>,
    _stop_listener: oneshot::Sender<()>,
}

impl PostgresStore {
    /// Connects with default settings, creating or upgrading the schema.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(PostgresConfig::new(url)).await
    }

    /// Connects with this configuration, creating or upgrading the schema.
    pub async fn connect_with(config: PostgresConfig) -> Result<Self, StoreError> {
        Self::connect_with_inline(config, Vec::new()).await
    }

    /// Connects with projections the writer updates in each append's own
    /// transaction (C6); see [`InlineProjection`]. Every process that
    /// appends to the database should register the same ones.
    pub async fn connect_with_inline(
        config: PostgresConfig,
        inline: Vec<Box<dyn InlineProjection>>,
    ) -> Result<Self, StoreError> {
        schema::validate_schema_name(&config.schema)?;
        let mut pg_config: tokio_postgres::Config = config.url.parse().map_err(|e| {
            StoreError::invalid_input(format!("invalid PostgreSQL connection string: {e}"))
        })?;
        if pg_config.get_connect_timeout().is_none() {
            pg_config.connect_timeout(config.connect_timeout);
        }
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("factline");
        }
        // Notice a silently dead server within a minute, not hours.
        pg_config.keepalives_idle(Duration::from_secs(30));
        // The writer and listener connections are told apart in
        // pg_stat_activity by a suffix.
        let named = |role: &str| {
            let mut named = pg_config.clone();
            let base = pg_config.get_application_name().unwrap_or("factline");
            named.application_name(format!("{base} {role}"));
            named
        };

        let (mut client, connection) = pg_config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| pg_error("connecting to PostgreSQL", e))?;
        let driver = tokio::spawn(connection);
        let sql = Arc::new(Sql::new(&config.schema));
        let setup = async {
            schema::migrate(&mut client, &config.schema).await?;
            let row = client
                .query_one(&sql.head, &[])
                .await
                .map_err(|e| pg_error("reading the head position", e))?;
            Ok::<_, StoreError>(row.get::<_, i64>(0) as u64)
        }
        .await;
        drop(client);
        let _ = driver.await;
        let head_position = setup?;

        let manager = Manager::from_config(
            pg_config.clone(),
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StorageError::with_source("building the connection pool", e))?;

        let (head, _) = watch::channel(head_position);
        let head = Arc::new(head);
        let counters = Arc::new(writer::Counters::default());
        let (queue, jobs) = mpsc::channel(config.queue_capacity.max(1));
        let writer = writer::Writer {
            pg_config: named("writer"),
            sql: sql.clone(),
            head: head.clone(),
            counters: counters.clone(),
            max_batch_events: config.max_batch_events.max(1),
            idle_in_transaction_timeout: config.idle_in_transaction_timeout,
            commit_gate: config.commit_gate.clone(),
            connection: None,
            known_streams: Default::default(),
            limits: config.limits,
            last_purge: None,
            inline,
        };
        tokio::spawn(writer.run(jobs));
        let (stop_listener, stopped) = oneshot::channel();
        let listener = head::Listener {
            pg_config: named("listener"),
            channel: sql.channel.clone(),
            head_sql: sql.head.clone(),
            head: head.clone(),
        };
        tokio::spawn(listener.run(stopped));

        Ok(PostgresStore {
            inner: Arc::new(Inner {
                limits: config.limits,
                sql,
                pool,
                queue,
                head,
                counters,
                _stop_listener: stop_listener,
            }),
        })
    }

    /// Appends waiting for the writer right now.
    pub fn queued_appends(&self) -> usize {
        self.inner.queue.max_capacity() - self.inner.queue.capacity()
    }

    /// The writer's counts so far.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            transactions: self.inner.counters.transactions.load(Ordering::Relaxed),
            appends: self.inner.counters.appends.load(Ordering::Relaxed),
            fast_transactions: self
                .inner
                .counters
                .fast_transactions
                .load(Ordering::Relaxed),
        }
    }

    /// A pooled connection and `sql` prepared on it.
    async fn prepared(
        &self,
        context: &str,
        sql: &str,
    ) -> Result<(deadpool_postgres::Object, tokio_postgres::Statement), StoreError> {
        let client = self
            .inner
            .pool
            .get()
            .await
            .map_err(|e| pool_error(context, e))?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| pg_error(context, e))?;
        Ok((client, statement))
    }

    async fn query(
        &self,
        context: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let (client, statement) = self.prepared(context, sql).await?;
        client
            .query(&statement, params)
            .await
            .map_err(|e| pg_error(context, e))
    }

    /// Runs an events query, taking rows as they arrive and stopping once
    /// they hold `max_bytes` of text (the rest is never decoded or kept).
    async fn read_events(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        max_bytes: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        use futures_util::TryStreamExt;
        const CONTEXT: &str = "reading events";
        let (client, statement) = self.prepared(CONTEXT, sql).await?;
        let rows = client
            .query_raw(&statement, params.iter().copied())
            .await
            .map_err(|e| pg_error(CONTEXT, e))?;
        let mut rows = std::pin::pin!(rows);
        let mut events = Vec::new();
        let mut budget = factline_core::ReadBudget::new(max_bytes);
        while let Some(row) = rows.try_next().await.map_err(|e| pg_error(CONTEXT, e))? {
            let event = decode_event(&row)?;
            let spent = budget.take(&event);
            events.push(event);
            if spent {
                break;
            }
        }
        Ok(events)
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        submit_append(
            &self.inner.queue,
            &self.inner.limits,
            stream_id,
            expected,
            events,
            "PostgreSQL writer task",
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
            &self.inner.queue,
            &self.inner.limits,
            stream_id,
            expected,
            events,
            command,
            "PostgreSQL writer task",
        )
        .await
    }

    async fn find_command(&self, key: &str) -> Result<Option<CommandRecord>, StoreError> {
        let keys = [key];
        let rows = self
            .query(
                "looking up a command key",
                &self.inner.sql.find_commands,
                &[&keys.as_slice()],
            )
            .await?;
        let retention = self.inner.limits.command_retention;
        match rows.first() {
            Some(row) => {
                let record = decode_command(row)?;
                Ok(Some(record).filter(|r| r.is_live(Utc::now(), retention)))
            }
            None => Ok(None),
        }
    }

    async fn purge_commands(&self) -> Result<u64, StoreError> {
        let cutoff = retention_cutoff(Utc::now(), self.inner.limits.command_retention);
        let client = self
            .inner
            .pool
            .get()
            .await
            .map_err(|e| pool_error("purging command keys", e))?;
        client
            .execute(&self.inner.sql.purge_commands, &[&cutoff])
            .await
            .map_err(|e| pg_error("purging command keys", e))
    }

    async fn save_snapshot(
        &self,
        stream_id: &StreamId,
        version: u64,
        snapshot_version: u32,
        data: &JsonText,
    ) -> Result<(), StoreError> {
        let version = sql_u64(version);
        let snapshot_version = i32::try_from(snapshot_version).map_err(|_| {
            StoreError::invalid_input(format!(
                "snapshot version {snapshot_version} is above {}",
                i32::MAX
            ))
        })?;
        self.query(
            "saving a snapshot",
            &self.inner.sql.save_snapshot,
            &[
                &stream_id.as_str(),
                &version,
                &snapshot_version,
                &data.as_str(),
            ],
        )
        .await
        .map(|_| ())
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let rows = self
            .query(
                "loading a snapshot",
                &self.inner.sql.load_snapshot,
                &[&stream_id.as_str()],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let data: &str = row.get(2);
        Ok(Some(Snapshot {
            stream_id: stream_id.clone(),
            version: row.get::<_, i64>(0) as u64,
            snapshot_version: row.get::<_, i32>(1) as u32,
            data: serde_json::from_str(data).map_err(|e| {
                StorageError::new(format!("the snapshot of {stream_id} is corrupt: {e}"))
            })?,
            recorded_at: row.get(3),
        }))
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
        let limit = sql_limit(options.limit);
        let sql = &self.inner.sql;
        match options.direction {
            Direction::Forwards => {
                let from = sql_u64(options.from_version.unwrap_or(1));
                let until = from.saturating_add(limit);
                self.read_events(
                    &sql.read_stream_forwards,
                    &[&stream_id.as_str(), &from, &limit, &until],
                    max_bytes,
                )
                .await
            }
            Direction::Backwards => {
                let from = options.from_version.map_or(i64::MAX, sql_u64);
                self.read_events(
                    &sql.read_stream_backwards,
                    &[&stream_id.as_str(), &from, &limit],
                    max_bytes,
                )
                .await
            }
        }
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
        let (from, limit) = (sql_u64(from), sql_limit(limit));
        let sql = &self.inner.sql;
        match filter {
            StreamFilter::All => {
                self.read_events(&sql.read_all, &[&from, &limit], max_bytes)
                    .await
            }
            StreamFilter::Category(category) => {
                self.read_events(
                    &sql.read_category,
                    &[&category.as_str(), &from, &limit],
                    max_bytes,
                )
                .await
            }
            StreamFilter::Stream(stream_id) => {
                self.read_events(
                    &sql.read_one_stream,
                    &[&stream_id.as_str(), &from, &limit],
                    max_bytes,
                )
                .await
            }
        }
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        let rows = self
            .query("reading the head position", &self.inner.sql.head, &[])
            .await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    async fn tally(&self, after: u64, max_events: u64) -> Result<Tally, StoreError> {
        let head = self.head_position().await?;
        let mut tally = Tally::new(head.min(after.saturating_add(max_events)));
        let rows = self
            .query(
                "counting events",
                &self.inner.sql.tally,
                &[&(after as i64), &(tally.upto as i64)],
            )
            .await?;
        for row in rows {
            let events: i64 = row.get(2);
            let started: i64 = row.get(3);
            tally.count(row.get(0), row.get(1), events as u64, started as u64);
        }
        Ok(tally)
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.inner.head.subscribe()
    }

    fn subscribe(&self, filter: StreamFilter, from: u64) -> Subscription {
        // Commits of every process arrive through the listener: no polling.
        Subscription::new(Arc::new(self.clone()), filter, from, None)
    }
}
