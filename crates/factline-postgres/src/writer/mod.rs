//! The writer task: group commit with serialised position assignment.
//!
//! Appends queue on a channel; the writer takes everything queued and
//! commits it in one transaction on its own connection. Every transaction
//! first locks the `head` row and holds that lock until it commits, so
//! positions are handed out in commit order across every process sharing
//! the database (see ARCHITECTURE.md for why that makes `$all` hole-free).
//!
//! A transaction is three round trips when nothing unusual happens: BEGIN,
//! the head lock and the stream lookup go out together; then the plan is
//! made in memory; then the inserts, the head update and COMMIT go out
//! together.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use factline_core::backend::writer_queue::{drain_batch, AppendJob};
use factline_core::backend::{retention_cutoff, ExistingEvent, StoredContent};
use factline_core::{
    AppendResult, Appended, CommandRecord, Limits, StorageError, StoreError, StreamId,
};
use tokio::sync::{mpsc, watch};
use tokio_postgres::error::SqlState;

use crate::inline::{InlineProjection, Refusal};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use crate::plan::{plan_batch, Commands, EventColumns, Head, NeedStoredIds, Plan};
use crate::sql::pg_error;

mod insert;
mod paths;

use crate::schema::Sql;
use insert::*;
use paths::*;

/// Test hook run after a transaction has taken its positions and written
/// its rows, just before COMMIT. Returning `false` rolls it back.
pub type CommitGate = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

#[derive(Default)]
pub(crate) struct Counters {
    pub transactions: AtomicU64,
    pub appends: AtomicU64,
    /// Transactions committed by the one-round-trip fast path.
    pub fast_transactions: AtomicU64,
}

pub(crate) struct Writer {
    pub pg_config: tokio_postgres::Config,
    pub sql: Arc<Sql>,
    pub head: Arc<watch::Sender<u64>>,
    pub counters: Arc<Counters>,
    pub max_batch_events: usize,
    pub idle_in_transaction_timeout: Duration,
    pub commit_gate: Option<CommitGate>,
    pub connection: Option<Connection>,
    /// The number and version of streams this writer has written, as of its
    /// last commit to each. Another process may have moved on since; see
    /// [`Writer::commit_batch`] for why a stale entry is harmless.
    pub known_streams: HashMap<String, (i64, u64)>,
    /// Command key retention and purge interval.
    pub limits: Limits,
    pub last_purge: Option<Instant>,
    /// Inline projections (C6): they need the slow path.
    pub inline: Vec<Box<dyn InlineProjection>>,
}

/// Most streams the writer remembers; past this it starts afresh.
const MAX_KNOWN_STREAMS: usize = 100_000;

/// Where the stream numbers of a relative plan start (new streams number
/// upwards from here; real stream numbers are positive).
pub(crate) const RELATIVE_STREAM_BASE: i64 = -(1 << 62);

/// The writer's connection with its statements prepared.
pub(crate) struct Connection {
    client: Client,
    channel: String,
    begin: Statement,
    commit: Statement,
    rollback: Statement,
    lock_head: Statement,
    update_head: Statement,
    find_streams: Statement,
    find_events: Statement,
    insert_streams: Statement,
    insert_events: Statement,
    insert_streams_relative: Statement,
    insert_events_relative: Statement,
    advance_head: Statement,
    append_in_one: Statement,
    find_commands: Statement,
    insert_commands: Statement,
    purge_commands: Statement,
}

impl Writer {
    /// Runs until every sender is gone (the store was dropped).
    pub async fn run(mut self, mut queue: mpsc::Receiver<AppendJob>) {
        while let Some(first) = queue.recv().await {
            let batch = drain_batch(first, &mut queue, self.max_batch_events);
            let outcomes = self.commit_batch(&batch).await;
            self.counters.transactions.fetch_add(1, Ordering::Relaxed);
            self.counters
                .appends
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let newest = outcomes
                .iter()
                .filter_map(|o| o.as_ref().ok().and_then(Appended::written_up_to))
                .max();
            if let Some(newest) = newest {
                // Wake subscribers before answering, so an appender that then
                // subscribes can never have missed its own wake-up.
                self.head.send_if_modified(|h| {
                    let raised = newest > *h;
                    *h = (*h).max(newest);
                    raised
                });
            }
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                // The caller may have gone away; its append stands regardless.
                let _ = job.reply.send(outcome);
            }
        }
    }

    /// Commits a batch in one transaction. A rejected append writes nothing
    /// and leaves the others alone; a database failure fails every append in
    /// the batch with the same error.
    ///
    /// The fast path is one round trip: the batch is planned from the
    /// streams this writer already knows, with positions and new stream
    /// numbers relative to the head, and BEGIN, the head lock, the inserts
    /// and COMMIT go out together. A stale guess cannot commit: every way
    /// the guess can be wrong (the stream moved on, it exists already, an
    /// event id is stored) makes an insert hit a unique index, which rolls
    /// the transaction back, and the batch goes the slow way. Appends the
    /// known streams cannot decide (an expected version that does not match,
    /// a retry) go the slow way at once.
    ///
    /// Appends with command keys always take the slow path, which looks
    /// their keys up under the head lock.
    async fn commit_batch(&mut self, batch: &[AppendJob]) -> Vec<Result<Appended, StoreError>> {
        // PostgreSQL keeps microseconds: what a batch hands back (a command
        // record replayed within the batch) must equal what is read later.
        let recorded_at = Utc::now().trunc_subsecs(6);
        let keyed = batch.iter().any(|job| job.command.is_some());
        let purge = keyed
            && self
                .last_purge
                .is_none_or(|at| at.elapsed() >= self.limits.command_purge_interval);
        if purge {
            self.last_purge = Some(Instant::now());
        }
        let commands = CommandRules {
            now: recorded_at,
            retention: self.limits.command_retention,
            purge,
        };
        let gate = self.commit_gate.clone();
        let relative = Head {
            last_position: 0,
            last_stream_no: RELATIVE_STREAM_BASE,
        };
        // Inline projections need the positions first: the slow path.
        let planned = match self.inline.is_empty() {
            true => plan_batch(batch, &[], &self.known_streams, None, None, relative).ok(),
            false => None,
        };
        if let Some(plan) = planned {
            let result = match self.take_connection().await {
                Ok(conn) => {
                    let result = attempt_fast(&conn, plan, recorded_at, gate.as_ref()).await;
                    self.put_back(conn);
                    result
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(Some((outcomes, streams))) => {
                    self.counters
                        .fast_transactions
                        .fetch_add(1, Ordering::Relaxed);
                    self.remember(streams);
                    return outcomes;
                }
                Ok(None) => {}
                Err(failure) => return fail_all(batch, &failure),
            }
        }
        // The slow path reads the streams' state under the head lock first.
        // Event ids are looked up only when an append's expected version
        // fails or an id repeats within the batch. An id stored earlier is
        // otherwise found by the unique index; then the batch is replayed
        // with every id looked up first. Only retries get there.
        let mut check_all_ids = false;
        // Appends an inline projection refused: written again without them.
        let mut refused: Vec<Option<StoreError>> = (0..batch.len()).map(|_| None).collect();
        loop {
            let skip: Vec<bool> = refused.iter().map(Option::is_some).collect();
            let mut inline = std::mem::take(&mut self.inline);
            let result = match self.take_connection().await {
                Ok(conn) => {
                    let result = attempt_batch(
                        &conn,
                        batch,
                        &skip,
                        check_all_ids,
                        &commands,
                        recorded_at,
                        gate.as_ref(),
                        &mut inline,
                        &self.sql.read_all,
                    )
                    .await;
                    self.put_back(conn);
                    result
                }
                Err(e) => Err(e),
            };
            if !matches!(result, Ok(Attempt::Committed(..))) {
                for projection in inline.iter_mut() {
                    projection.rolled_back();
                }
            }
            self.inline = inline;
            match result {
                Ok(Attempt::Committed(mut outcomes, streams)) => {
                    self.remember(streams);
                    for (outcome, refusal) in outcomes.iter_mut().zip(refused) {
                        if let Some(refusal) = refusal {
                            *outcome = Err(refusal);
                        }
                    }
                    return outcomes;
                }
                Ok(Attempt::InlineRefused { index, error }) => {
                    let Some(index) = index.filter(|i| refused[*i].is_none()) else {
                        // An event from before this batch: no append can
                        // pass until it is fixed.
                        return batch
                            .iter()
                            .map(|_| Err(error.clone_refusal()))
                            .collect();
                    };
                    refused[index] = Some(error.into());
                }
                Ok(Attempt::StoredEventId) if !check_all_ids => check_all_ids = true,
                Ok(Attempt::StoredEventId) => {
                    return fail_all(
                        batch,
                        &StorageError::new(
                            "an event id was stored concurrently by something other than a factline writer",
                        ),
                    )
                }
                Err(failure) => return fail_all(batch, &failure),
            }
        }
    }

    fn remember(&mut self, streams: Vec<(String, i64, u64)>) {
        if self.known_streams.len() + streams.len() > MAX_KNOWN_STREAMS {
            self.known_streams.clear();
        }
        for (stream_id, stream_no, version) in streams {
            self.known_streams.insert(stream_id, (stream_no, version));
        }
    }

    /// The writer's connection, opened if there is none or it was lost.
    async fn take_connection(&mut self) -> Result<Connection, StorageError> {
        match self.connection.take() {
            Some(conn) if !conn.client.is_closed() => Ok(conn),
            _ => self.open().await.map_err(storage),
        }
    }

    fn put_back(&mut self, conn: Connection) {
        if !conn.client.is_closed() {
            self.connection = Some(conn);
        }
    }

    async fn open(&self) -> Result<Connection, StoreError> {
        let err = |e| pg_error("connecting the writer", e);
        let (client, connection) = self.pg_config.connect(NoTls).await.map_err(err)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "writer connection ended");
            }
        });
        // A writer stalled inside a transaction holds the head lock that
        // every process's appends wait for; the server ends it instead.
        client
            .batch_execute(&format!(
                "SET idle_in_transaction_session_timeout = {}",
                self.idle_in_transaction_timeout.as_millis().max(1)
            ))
            .await
            .map_err(err)?;
        let sql = &self.sql;
        let (
            begin,
            commit,
            rollback,
            lock_head,
            update_head,
            find_streams,
            find_events,
            insert_streams,
            insert_events,
            insert_streams_relative,
            insert_events_relative,
            advance_head,
            append_in_one,
            find_commands,
            insert_commands,
            purge_commands,
        ) = tokio::try_join!(
            client.prepare("BEGIN"),
            client.prepare("COMMIT"),
            client.prepare("ROLLBACK"),
            client.prepare(&sql.lock_head),
            client.prepare(&sql.update_head),
            client.prepare(&sql.find_streams),
            client.prepare(&sql.find_events),
            client.prepare(&sql.insert_streams),
            client.prepare(&sql.insert_events),
            client.prepare(&sql.insert_streams_relative),
            client.prepare(&sql.insert_events_relative),
            client.prepare(&sql.advance_head),
            client.prepare(&sql.append_in_one),
            client.prepare(&sql.find_commands),
            client.prepare(&sql.insert_commands),
            client.prepare(&sql.purge_commands),
        )
        .map_err(err)?;
        Ok(Connection {
            client,
            channel: sql.channel.clone(),
            begin,
            commit,
            rollback,
            lock_head,
            update_head,
            find_streams,
            find_events,
            insert_streams,
            insert_events,
            insert_streams_relative,
            insert_events_relative,
            advance_head,
            append_in_one,
            find_commands,
            insert_commands,
            purge_commands,
        })
    }
}

fn fail_all(batch: &[AppendJob], failure: &StorageError) -> Vec<Result<Appended, StoreError>> {
    tracing::warn!(error = %failure, appends = batch.len(), "group commit failed");
    batch
        .iter()
        .map(|_| {
            let err = StorageError::new(failure.message().to_string());
            Err(if failure.is_retryable() {
                err.retryable()
            } else {
                err
            }
            .into())
        })
        .collect()
}

fn storage(e: StoreError) -> StorageError {
    match e {
        StoreError::Storage(s) => s,
        other => StorageError::new(other.to_string()),
    }
}

/// What the slow path did with a batch.
enum Attempt {
    Committed(Vec<Result<Appended, StoreError>>, Vec<(String, i64, u64)>),
    /// The insert hit an event id stored before this transaction; it was
    /// rolled back.
    StoredEventId,
    /// An inline projection refused an event of the append at `index` (of
    /// none of the batch's appends: `None`); rolled back.
    InlineRefused {
        index: Option<usize>,
        error: InlineRefusal,
    },
}

/// An inline projection's refusal, handed to every append it fails.
pub(crate) struct InlineRefusal {
    projection: String,
    message: String,
}

impl InlineRefusal {
    fn clone_refusal(&self) -> StoreError {
        StoreError::InlineRefused {
            projection: self.projection.clone(),
            message: self.message.clone(),
        }
    }
}

impl From<InlineRefusal> for StoreError {
    fn from(r: InlineRefusal) -> Self {
        StoreError::InlineRefused {
            projection: r.projection,
            message: r.message,
        }
    }
}

fn owned_streams(streams: &[(&str, i64, u64)]) -> Vec<(String, i64, u64)> {
    streams
        .iter()
        .map(|&(id, no, version)| (id.to_string(), no, version))
        .collect()
}
