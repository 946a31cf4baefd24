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

use crate::error::pg_error;
use crate::plan::{plan_batch, Commands, EventColumns, Head, NeedStoredIds, Plan};
use crate::schema::Sql;

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

/// The fast path: `plan` was made relative to the head. `Ok(None)` means a
/// unique index refused the guess and nothing was committed.
#[allow(clippy::type_complexity)]
async fn attempt_fast(
    conn: &Connection,
    plan: Plan<'_>,
    recorded_at: DateTime<Utc>,
    gate: Option<&CommitGate>,
) -> Result<Option<(Vec<Result<Appended, StoreError>>, Vec<(String, i64, u64)>)>, StorageError> {
    let head = if gate.is_none() && plan.events.position.len() <= INSERT_CHUNK_EVENTS {
        match append_in_one(conn, &plan, recorded_at).await? {
            Some(head) => head,
            None => return Ok(None),
        }
    } else {
        match attempt_pipelined(conn, &plan, recorded_at, gate).await? {
            Ok(head) => head,
            Err(Collision { .. }) => return Ok(None),
        }
    };
    let mut outcomes = plan.outcomes;
    for outcome in outcomes.iter_mut() {
        if let Ok(Appended::Written(result)) = outcome {
            result.first_position += head.last_position;
            result.last_position += head.last_position;
        }
    }
    let streams = plan
        .streams
        .iter()
        .map(|&(id, no, version)| {
            let no = if no < 0 {
                head.last_stream_no + (no - RELATIVE_STREAM_BASE)
            } else {
                no
            };
            (id.to_string(), no, version)
        })
        .collect();
    Ok(Some((outcomes, streams)))
}

/// A small batch in one statement, committed on its own: one message to
/// the server and one answer. `Ok(None)`: a unique index refused the guess.
async fn append_in_one(
    conn: &Connection,
    plan: &Plan<'_>,
    recorded_at: DateTime<Utc>,
) -> Result<Option<Head>, StorageError> {
    let e = plan.events.slice(0..plan.events.position.len());
    let new = &plan.new_streams;
    let base = RELATIVE_STREAM_BASE;
    let (events, new_streams) = plan.relative_size();
    let params: [&(dyn ToSql + Sync); 16] = [
        &e.position,
        &e.stream_no,
        &e.version,
        &e.category,
        &e.event_id,
        &e.event_type,
        &e.data,
        &e.metadata,
        &recorded_at,
        &base,
        &events,
        &new_streams,
        &new.stream_no,
        &new.stream_id,
        &new.category,
        &conn.channel,
    ];
    match conn.client.query_one(&conn.append_in_one, &params).await {
        Ok(row) => Ok(Some(Head {
            last_position: row.get::<_, i64>(0) as u64,
            last_stream_no: row.get(1),
        })),
        Err(e) => match write_failure("appending", e) {
            WriteFailure::Collided(_) => Ok(None),
            WriteFailure::Rejected(e) => Err(e),
            WriteFailure::Lost(e) => Err(outcome_unknown(e)),
        },
    }
}

/// BEGIN, head, inserts and COMMIT pipelined in one round trip.
async fn attempt_pipelined(
    conn: &Connection,
    plan: &Plan<'_>,
    recorded_at: DateTime<Utc>,
    gate: Option<&CommitGate>,
) -> Result<Result<Head, Collision>, StorageError> {
    let client = &conn.client;
    let (events, new_streams) = plan.relative_size();
    let advance_params: [&(dyn ToSql + Sync); 3] = [&events, &new_streams, &conn.channel];
    let writes = async {
        let (begun, advanced, written) = tokio::join!(
            client.execute(&conn.begin, &[]),
            client.query_one(&conn.advance_head, &advance_params),
            write_plan(conn, plan, recorded_at, Placement::Relative),
        );
        begun.map_err(|e| write_failure("starting the append transaction", e))?;
        let advanced = advanced.map_err(|e| write_failure("advancing the head position", e))?;
        written?;
        Ok(Head {
            last_position: advanced.get::<_, i64>(0) as u64,
            last_stream_no: advanced.get(1),
        })
    };
    commit_writes(conn, writes, gate).await
}

/// The connection failed with the commit on its way: the server may have
/// committed before it went.
fn outcome_unknown(e: StorageError) -> StorageError {
    StorageError::new(format!(
        "{}; the appends may or may not have been committed, and retrying them with the same event ids is safe",
        e.message()
    ))
    .retryable()
}

/// How the slow path treats command keys in a batch.
struct CommandRules {
    now: DateTime<Utc>,
    retention: Duration,
    /// Delete expired keys in this transaction.
    purge: bool,
}

#[allow(clippy::too_many_arguments)]
async fn attempt_batch(
    conn: &Connection,
    batch: &[AppendJob],
    skip: &[bool],
    check_all_ids: bool,
    rules: &CommandRules,
    recorded_at: DateTime<Utc>,
    gate: Option<&CommitGate>,
    inline: &mut [Box<dyn InlineProjection>],
    read_all: &str,
) -> Result<Attempt, StorageError> {
    let client = &conn.client;
    let mut stream_ids: Vec<&str> = batch.iter().map(|j| j.stream_id.as_str()).collect();
    stream_ids.sort_unstable();
    stream_ids.dedup();
    let find_params: [&(dyn ToSql + Sync); 1] = [&stream_ids];
    let keys: Vec<&str> = batch
        .iter()
        .filter_map(|j| j.command.as_ref().map(|c| c.key.as_str()))
        .collect();
    let cutoff = retention_cutoff(rules.now, rules.retention);
    // Pipelined behind the head lock, so they run under it: no other
    // writer can store one of these keys until this transaction ends.
    let (begun, locked, found, purged, commands) = tokio::join!(
        client.execute(&conn.begin, &[]),
        client.query_one(&conn.lock_head, &[]),
        client.query(&conn.find_streams, &find_params),
        async {
            if !rules.purge {
                return Ok(0);
            }
            client.execute(&conn.purge_commands, &[&cutoff]).await
        },
        async {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            client.query(&conn.find_commands, &[&keys]).await
        },
    );
    let opened = async {
        begun.map_err(|e| pg_error("starting the append transaction", e))?;
        let locked = locked.map_err(|e| pg_error("locking the head position", e))?;
        let found = found.map_err(|e| pg_error("looking up streams", e))?;
        purged.map_err(|e| pg_error("purging expired command keys", e))?;
        let commands = commands.map_err(|e| pg_error("looking up command keys", e))?;
        let mut stored_commands = HashMap::with_capacity(commands.len());
        for row in &commands {
            let record = crate::decode_command(row)?;
            stored_commands.insert(record.key.clone(), record);
        }
        let head = Head {
            last_position: locked.get::<_, i64>(0) as u64,
            last_stream_no: locked.get(1),
        };
        let mut streams = HashMap::with_capacity(found.len());
        for row in found {
            let (id, stream_no): (String, i64) = (row.get(0), row.get(1));
            let version: Option<i64> = row.get(2);
            streams.insert(id, (stream_no, version.unwrap_or(0) as u64));
        }
        Ok::<_, StoreError>((head, streams, stored_commands))
    }
    .await;
    let (head, streams, stored_commands) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            rollback(conn).await;
            return Err(storage(e));
        }
    };
    let mut stored = None;
    if check_all_ids {
        stored = Some(find_events(conn, batch).await?);
    }
    let commands = Commands {
        stored: stored_commands,
        now: rules.now,
        retention: rules.retention,
    };
    let plan = loop {
        match plan_batch(
            batch,
            skip,
            &streams,
            stored.as_ref(),
            Some(&commands),
            head,
        ) {
            Ok(plan) => break plan,
            Err(NeedStoredIds) => stored = Some(find_events(conn, batch).await?),
        }
    };
    if plan.events.position.is_empty() {
        if rules.purge {
            // Nothing to append, but the purge stands.
            if let Err(e) = client.execute(&conn.commit, &[]).await {
                tracing::debug!(error = %e, "committing a purge of command keys failed");
            }
        } else {
            rollback(conn).await;
        }
        return Ok(Attempt::Committed(plan.outcomes, Vec::new()));
    }
    let writes = write_plan(conn, &plan, recorded_at, Placement::Absolute);
    if !inline.is_empty() {
        let undone = write_with_inline(conn, &plan, writes, gate, inline, read_all, head).await?;
        return Ok(match undone {
            Some(attempt) => attempt,
            None => Attempt::Committed(plan.outcomes, owned_streams(&plan.streams)),
        });
    }
    match commit_writes(conn, writes, gate).await? {
        Ok(()) => {
            let streams = owned_streams(&plan.streams);
            Ok(Attempt::Committed(plan.outcomes, streams))
        }
        Err(Collision { on_event_id: true }) => Ok(Attempt::StoredEventId),
        Err(Collision { on_event_id: false }) => Err(StorageError::new(
            "a stream or version was written concurrently by something other than a factline writer",
        )),
    }
}

/// The slow path's writes, then the inline projections up to the batch's
/// last position, then COMMIT (`None`); a refusal rolls everything back
/// and names the append it came from.
async fn write_with_inline(
    conn: &Connection,
    plan: &Plan<'_>,
    writes: impl Future<Output = Result<(), WriteFailure>>,
    gate: Option<&CommitGate>,
    inline: &mut [Box<dyn InlineProjection>],
    read_all: &str,
    head: Head,
) -> Result<Option<Attempt>, StorageError> {
    match writes.await {
        Ok(()) => {}
        Err(failure) => {
            rollback(conn).await;
            return match failure {
                WriteFailure::Collided(Collision { on_event_id: true }) => {
                    Ok(Some(Attempt::StoredEventId))
                }
                WriteFailure::Collided(Collision { on_event_id: false }) => Err(StorageError::new(
                    "a stream or version was written concurrently by something other than a factline writer",
                )),
                WriteFailure::Rejected(e) | WriteFailure::Lost(e) => Err(e),
            };
        }
    }
    let last = plan.events.position.last().map_or(0, |p| *p as u64);
    match crate::inline::catch_up(&conn.client, read_all, inline, last).await {
        Ok(()) => {}
        Err(Refusal::Storage(e)) => {
            rollback(conn).await;
            return Err(storage(e));
        }
        Err(Refusal::Event {
            position,
            projection,
            message,
        }) => {
            rollback(conn).await;
            let index = (position > head.last_position)
                .then(|| {
                    plan.outcomes.iter().position(|o| {
                        matches!(o, Ok(Appended::Written(r))
                            if r.first_position <= position && position <= r.last_position)
                    })
                })
                .flatten();
            return Ok(Some(Attempt::InlineRefused {
                index,
                error: InlineRefusal {
                    projection,
                    message,
                },
            }));
        }
    }
    if let Some(gate) = gate {
        if !gate().await {
            rollback(conn).await;
            return Err(StorageError::new("the commit was cancelled"));
        }
    }
    match conn.client.execute(&conn.commit, &[]).await {
        Ok(_) => Ok(None),
        Err(e) => Err(outcome_unknown(storage(pg_error("committing appends", e)))),
    }
}

/// A unique index refused a row; the transaction was rolled back.
struct Collision {
    /// It was an event id (else a stream id or stream version).
    on_event_id: bool,
}

/// Sends `writes` with COMMIT right behind them in the pipeline (or, with a
/// commit gate, waits for the gate in between), and works out what the
/// server did.
async fn commit_writes<T>(
    conn: &Connection,
    writes: impl Future<Output = Result<T, WriteFailure>>,
    gate: Option<&CommitGate>,
) -> Result<Result<T, Collision>, StorageError> {
    let client = &conn.client;
    let (written, committed) = match gate {
        None => tokio::join!(writes, client.execute(&conn.commit, &[])),
        Some(gate) => match writes.await {
            Ok(value) if gate().await => (Ok(value), client.execute(&conn.commit, &[]).await),
            Ok(_) => {
                rollback(conn).await;
                return Err(StorageError::new("the commit was cancelled"));
            }
            Err(e) => {
                rollback(conn).await;
                return match e {
                    WriteFailure::Collided(collision) => Ok(Err(collision)),
                    WriteFailure::Rejected(e) | WriteFailure::Lost(e) => Err(e),
                };
            }
        },
    };
    match (written, committed) {
        (Ok(value), Ok(_)) => Ok(Ok(value)),
        // The server refused a write, so the COMMIT that followed it in the
        // pipeline could only roll back.
        (Err(WriteFailure::Collided(collision)), _) => Ok(Err(collision)),
        (Err(WriteFailure::Rejected(e)), _) => {
            rollback(conn).await;
            Err(e)
        }
        // The connection failed with COMMIT already sent: the server may
        // have committed before it went.
        (Ok(_), Err(e)) | (Err(WriteFailure::Lost(_)), Err(e)) => {
            Err(outcome_unknown(storage(pg_error("committing appends", e))))
        }
        (Err(WriteFailure::Lost(e)), Ok(_)) => Err(e),
    }
}

enum WriteFailure {
    Collided(Collision),
    /// The server refused a write: the transaction is aborted.
    Rejected(StorageError),
    /// No answer came (the connection failed).
    Lost(StorageError),
}

fn write_failure(context: &str, e: tokio_postgres::Error) -> WriteFailure {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        let on_event_id = e
            .as_db_error()
            .and_then(|db| db.constraint())
            .is_some_and(|c| c.ends_with("event_id_key"));
        return WriteFailure::Collided(Collision { on_event_id });
    }
    if e.as_db_error().is_some() {
        WriteFailure::Rejected(storage(pg_error(context, e)))
    } else {
        WriteFailure::Lost(storage(pg_error(context, e)))
    }
}

/// Whether a plan's positions and new stream numbers are final or relative
/// to the head row as locked in the same transaction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    Absolute,
    Relative,
}

/// Sends the plan's writes and awaits them all. They are pipelined with each
/// other (and, by the caller, with COMMIT): one round trip for all.
async fn write_plan(
    conn: &Connection,
    plan: &Plan<'_>,
    recorded_at: DateTime<Utc>,
    placement: Placement,
) -> Result<(), WriteFailure> {
    let client = &conn.client;
    let e = &plan.events;
    let new = &plan.new_streams;
    let base = RELATIVE_STREAM_BASE;
    let (relative_events, relative_streams) = plan.relative_size();
    let mut stream_params: Vec<&(dyn ToSql + Sync)> =
        vec![&new.stream_no, &new.stream_id, &new.category];
    // A large batch goes out as several INSERTs in the same pipeline: the
    // server starts on the first while the rest are still arriving, instead
    // of waiting for one large message to cross the socket.
    let total = e.position.len();
    let mut chunks: Vec<EventSlices> = Vec::new();
    let mut start = 0;
    while start < total {
        // A small first chunk gets the server going soonest.
        let size = if start == 0 && total > INSERT_CHUNK_EVENTS {
            FIRST_CHUNK_EVENTS
        } else {
            INSERT_CHUNK_EVENTS
        };
        let end = (start + size).min(total);
        chunks.push(e.slice(start..end));
        start = end;
    }
    let event_params: Vec<Vec<&(dyn ToSql + Sync)>> = chunks
        .iter()
        .map(|c| {
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![
                &c.position,
                &c.stream_no,
                &c.version,
                &c.category,
                &c.event_id,
                &c.event_type,
                &c.data,
                &c.metadata,
                &recorded_at,
            ];
            if placement == Placement::Relative {
                params.extend([
                    &base as &(dyn ToSql + Sync),
                    &relative_events,
                    &relative_streams,
                ]);
            }
            params
        })
        .collect();
    let last_position = plan.head.last_position as i64;
    let head_params: [&(dyn ToSql + Sync); 3] =
        [&last_position, &plan.head.last_stream_no, &conn.channel];
    let (insert_streams, insert_events) = match placement {
        Placement::Relative => {
            stream_params.extend([&base as &(dyn ToSql + Sync), &relative_streams]);
            (&conn.insert_streams_relative, &conn.insert_events_relative)
        }
        Placement::Absolute => (&conn.insert_streams, &conn.insert_events),
    };
    let commands = CommandColumns::new(&plan.commands);
    let command_params: [&(dyn ToSql + Sync); 9] = [
        &commands.key,
        &commands.fingerprint,
        &commands.stream_id,
        &commands.first_version,
        &commands.last_version,
        &commands.first_position,
        &commands.last_position,
        &recorded_at,
        &commands.event_ids,
    ];
    let (inserted_streams, inserted_events, updated_head, inserted_commands) = tokio::join!(
        async {
            if new.stream_no.is_empty() {
                return Ok(0);
            }
            client.execute(insert_streams, &stream_params).await
        },
        futures_util::future::join_all(
            event_params
                .iter()
                .map(|params| client.execute(insert_events, params)),
        ),
        async {
            // A relative plan's caller advanced the head before the inserts.
            if placement == Placement::Relative {
                return Ok(Vec::new());
            }
            client.query(&conn.update_head, &head_params).await
        },
        async {
            if commands.key.is_empty() {
                return Ok(0);
            }
            client.execute(&conn.insert_commands, &command_params).await
        },
    );
    inserted_streams.map_err(|e| write_failure("inserting streams", e))?;
    // The first failure is the cause; the chunks after it only report the
    // aborted transaction.
    for inserted in inserted_events {
        inserted.map_err(|e| write_failure("inserting events", e))?;
    }
    updated_head.map_err(|e| write_failure("updating the head position", e))?;
    inserted_commands.map_err(|e| write_failure("storing command keys", e))?;
    Ok(())
}

/// Command records, column by column, ready for `unnest`.
struct CommandColumns<'a> {
    key: Vec<&'a str>,
    fingerprint: Vec<&'a str>,
    stream_id: Vec<&'a str>,
    first_version: Vec<i64>,
    last_version: Vec<i64>,
    first_position: Vec<i64>,
    last_position: Vec<i64>,
    /// Comma-separated, one string per record (arrays of arrays do not
    /// `unnest` per row).
    event_ids: Vec<String>,
}

impl<'a> CommandColumns<'a> {
    fn new(records: &'a [CommandRecord]) -> Self {
        let column = |f: fn(&AppendResult) -> u64| -> Vec<i64> {
            records.iter().map(|r| f(&r.result) as i64).collect()
        };
        CommandColumns {
            key: records.iter().map(|r| r.key.as_str()).collect(),
            fingerprint: records.iter().map(|r| r.fingerprint.as_str()).collect(),
            stream_id: records
                .iter()
                .map(|r| r.result.stream_id.as_str())
                .collect(),
            first_version: column(|r| r.first_version),
            last_version: column(|r| r.last_version),
            first_position: column(|r| r.first_position),
            last_position: column(|r| r.last_position),
            event_ids: records
                .iter()
                .map(|r| {
                    let ids: Vec<String> = r.event_ids.iter().map(Uuid::to_string).collect();
                    ids.join(",")
                })
                .collect(),
        }
    }
}

/// Events per INSERT statement of a batch (the first one: fewer).
const INSERT_CHUNK_EVENTS: usize = 128;
const FIRST_CHUNK_EVENTS: usize = 32;

/// One chunk of a plan's event columns.
struct EventSlices<'p, 'a> {
    position: &'p [i64],
    stream_no: &'p [i64],
    version: &'p [i64],
    category: &'p [&'a str],
    event_id: &'p [Uuid],
    event_type: &'p [&'a str],
    data: &'p [&'a str],
    metadata: &'p [Option<&'a str>],
}

impl<'a> EventColumns<'a> {
    fn slice(&self, range: std::ops::Range<usize>) -> EventSlices<'_, 'a> {
        EventSlices {
            position: &self.position[range.clone()],
            stream_no: &self.stream_no[range.clone()],
            version: &self.version[range.clone()],
            category: &self.category[range.clone()],
            event_id: &self.event_id[range.clone()],
            event_type: &self.event_type[range.clone()],
            data: &self.data[range.clone()],
            metadata: &self.metadata[range],
        }
    }
}

async fn rollback(conn: &Connection) {
    // On a broken connection the server rolls back by itself.
    let _ = conn.client.execute(&conn.rollback, &[]).await;
}

/// Where each of the batch's event ids is already stored, if anywhere.
async fn find_events(
    conn: &Connection,
    batch: &[AppendJob],
) -> Result<HashMap<Uuid, ExistingEvent>, StorageError> {
    let ids: Vec<Uuid> = batch
        .iter()
        .flat_map(|j| j.events.iter().map(|e| e.event_id))
        .collect();
    let rows = match conn.client.query(&conn.find_events, &[&ids]).await {
        Ok(rows) => rows,
        Err(e) => {
            rollback(conn).await;
            return Err(storage(pg_error("looking up event ids", e)));
        }
    };
    let mut stored = HashMap::with_capacity(rows.len());
    for row in rows {
        let stream: String = row.get(1);
        let stream_id = StreamId::new(stream).map_err(|e| {
            StorageError::new(format!("a stored event has a corrupt stream id: {e}"))
        })?;
        stored.insert(
            row.get::<_, Uuid>(0),
            ExistingEvent {
                stream_id,
                version: row.get::<_, i64>(2) as u64,
                position: row.get::<_, i64>(3) as u64,
                content: StoredContent {
                    event_type: row.get(4),
                    data: row.get(5),
                    metadata: row.get(6),
                },
            },
        );
    }
    Ok(stored)
}
