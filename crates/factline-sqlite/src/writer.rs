//! The single writer thread and its group commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::Instant;

use chrono::{DateTime, SubsecRound, Utc};
use factline_core::backend::writer_queue::{drain_batch, new_command_record, AppendJob};
use factline_core::backend::{
    resolve_command, resolve_duplicates, retention_cutoff, ExistingEvent, StoredContent,
};
use factline_core::{
    AppendResult, Appended, InlineError, Limits, StorageError, StoreError, StreamId,
};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, watch};

use crate::checkpoint::Nudge;
use crate::inline::InlineProjection;
use crate::is_transient;

#[derive(Default)]
pub(crate) struct Counters {
    pub transactions: AtomicU64,
    pub appends: AtomicU64,
}

/// What the writer thread works with besides its queue.
pub(crate) struct Writer {
    pub conn: Connection,
    pub checkpoints: Nudge,
    pub head: Arc<watch::Sender<u64>>,
    pub counters: Arc<Counters>,
    pub max_batch_events: usize,
    pub limits: Limits,
    pub inline: Vec<Box<dyn InlineProjection>>,
}

pub(crate) fn spawn(writer: Writer, queue: mpsc::Receiver<AppendJob>) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name("factline-sqlite-writer".into())
        .spawn(move || run(writer, queue))
        .map(|_| ())
        .map_err(|e| StorageError::with_source("starting the SQLite writer thread", e).into())
}

/// Brings the inline projections up to the head before the first append.
pub(crate) fn catch_up_inline(conn: &mut Connection, inline: &mut [Box<dyn InlineProjection>]) {
    if inline.is_empty() {
        return;
    }
    let result = (|| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let head = written_up_to(&tx)?;
        let caught_up = crate::inline::catch_up(&tx, inline, head)?;
        tx.commit()?;
        Ok::<_, rusqlite::Error>(caught_up)
    })();
    let failure = match result {
        Ok(Ok(())) => return,
        Ok(Err((projection, error))) => format!("{projection}: {error}"),
        Err(e) => e.to_string(),
    };
    for projection in inline.iter_mut() {
        projection.rolled_back();
    }
    // Every append tries again and fails with the reason until it is fixed.
    tracing::error!(error = %failure, "an inline projection cannot catch up with the log");
}

/// The highest position stored.
fn written_up_to(conn: &Connection) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT COALESCE(MAX(position), 0) FROM events")?
        .query_row([], |r| r.get::<_, i64>(0))
        .map(|p| p as u64)
}

/// Runs until every sender is gone (the store was dropped).
fn run(writer: Writer, mut queue: mpsc::Receiver<AppendJob>) {
    let Writer {
        mut conn,
        checkpoints,
        head,
        counters,
        max_batch_events,
        limits,
        mut inline,
    } = writer;
    let limits = &limits;
    let mut last_purge: Option<Instant> = None;
    while let Some(first) = queue.blocking_recv() {
        let batch = drain_batch(first, &mut queue, max_batch_events);
        // Expired command keys go while commands come in, in the same
        // transaction as a batch that stores keys.
        let purge_due = batch.iter().any(|job| job.command.is_some())
            && last_purge.is_none_or(|at| at.elapsed() >= limits.command_purge_interval);
        if purge_due {
            last_purge = Some(Instant::now());
        }
        let outcomes = commit_batch(&mut conn, &batch, limits, purge_due, &mut inline);
        counters.transactions.fetch_add(1, Ordering::Relaxed);
        counters
            .appends
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let newest = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok().and_then(Appended::written_up_to))
            .max();
        if let Some(newest) = newest {
            checkpoints.after_commit();
            // Wake subscribers before answering, so an appender that then
            // subscribes can never have missed its own wake-up.
            head.send_if_modified(|h| {
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

/// Commits a batch in one transaction. A rejected append writes nothing and
/// leaves the others alone; a database failure fails every append in the
/// batch, since none of them is durable.
///
/// The common path takes no savepoints: rejections are decided before an
/// append inserts anything. The one thing found only by inserting is an
/// event id that is already stored; then the transaction is rolled back and
/// the batch replayed with that append checking its ids before inserting.
/// Replays are rare (only retries hit them) and bounded by the batch size.
fn commit_batch(
    conn: &mut Connection,
    batch: &[AppendJob],
    limits: &Limits,
    purge: bool,
    inline: &mut [Box<dyn InlineProjection>],
) -> Vec<Result<Appended, StoreError>> {
    // Stored as microseconds; records handed back must equal those read.
    let now = Utc::now().trunc_subsecs(6);
    let mut check_ids_first = vec![false; batch.len()];
    loop {
        let attempt = attempt_batch(conn, batch, &check_ids_first, now, limits, purge, inline);
        if !matches!(attempt, Ok(Attempt::Committed(_))) {
            for projection in inline.iter_mut() {
                projection.rolled_back();
            }
        }
        match attempt {
            Ok(Attempt::Committed(outcomes)) => return outcomes,
            Ok(Attempt::DuplicateIn(index)) => check_ids_first[index] = true,
            Err(e) => {
                tracing::warn!(error = %e, appends = batch.len(), "group commit failed");
                // Every caller gets its own error with the same message.
                let transient = is_transient(&e);
                return batch
                    .iter()
                    .map(|_| {
                        let err = StorageError::new(format!("committing appends: {e}"));
                        Err(if transient { err.retryable() } else { err }.into())
                    })
                    .collect();
            }
        }
    }
}

enum Attempt {
    Committed(Vec<Result<Appended, StoreError>>),
    /// The append at this index hit an already-stored event id; the
    /// transaction was rolled back.
    DuplicateIn(usize),
}

fn attempt_batch(
    conn: &mut Connection,
    batch: &[AppendJob],
    check_ids_first: &[bool],
    now: DateTime<Utc>,
    limits: &Limits,
    purge: bool,
    inline: &mut [Box<dyn InlineProjection>],
) -> rusqlite::Result<Attempt> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if purge {
        crate::commands::purge(&tx, retention_cutoff(now, limits.command_retention))?;
    }
    // With inline projections each append runs on a savepoint, so that one
    // they refuse leaves the others of the batch alone.
    let mut stored_up_to = match inline.is_empty() {
        true => 0,
        false => written_up_to(&tx)?,
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    for (index, job) in batch.iter().enumerate() {
        if !inline.is_empty() {
            tx.execute_batch("SAVEPOINT inline_append")?;
        }
        let appended = append_job(&tx, job, check_ids_first[index], now, limits);
        let appended = match appended {
            Ok(Ok(Appended::Written(result))) if result.last_position > stored_up_to => {
                stored_up_to = result.last_position;
                match crate::inline::catch_up(&tx, inline, result.last_position)? {
                    Ok(()) => Ok(Ok(Appended::Written(result))),
                    Err((projection, error)) => {
                        tx.execute_batch("ROLLBACK TO inline_append")?;
                        stored_up_to = written_up_to(&tx)?;
                        for projection in inline.iter_mut() {
                            projection.rolled_back();
                        }
                        Ok(Err(match error {
                            InlineError::Failed(failure) => StoreError::Storage(failure),
                            refusal => StoreError::InlineRefused {
                                projection,
                                message: refusal.to_string(),
                            },
                        }))
                    }
                }
            }
            other => other,
        };
        if !inline.is_empty() && appended.is_ok() {
            tx.execute_batch("RELEASE inline_append")?;
        }
        match appended {
            Ok(outcome) => outcomes.push(outcome),
            Err(e)
                if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
                    && !check_ids_first[index] =>
            {
                // Dropping `tx` rolls back.
                return Ok(Attempt::DuplicateIn(index));
            }
            Err(e) => return Err(e),
        }
    }
    tx.commit()?;
    Ok(Attempt::Committed(outcomes))
}

/// Appends one job inside the batch transaction, with its command record
/// when it has a key. A key stored by an earlier job of the batch is seen
/// here too (same transaction), so repeats within a batch replay.
fn append_job(
    conn: &Connection,
    job: &AppendJob,
    check_ids_first: bool,
    now: DateTime<Utc>,
    limits: &Limits,
) -> rusqlite::Result<Result<Appended, StoreError>> {
    let Some(command) = &job.command else {
        let appended = append_one(conn, job, check_ids_first, now.timestamp_micros())?;
        return Ok(appended.map(Appended::Written));
    };
    let stored = match crate::commands::find(conn, &command.key)? {
        Ok(stored) => stored,
        Err(corrupt) => return Ok(Err(corrupt)),
    };
    match resolve_command(command, stored.as_ref(), now, limits.command_retention) {
        Ok(Some(record)) => return Ok(Ok(Appended::Replayed(record))),
        Ok(None) => {}
        Err(rejection) => return Ok(Err(rejection)),
    }
    let result = match append_one(conn, job, check_ids_first, now.timestamp_micros())? {
        Ok(result) => result,
        Err(rejection) => return Ok(Err(rejection)),
    };
    crate::commands::insert(conn, &new_command_record(job, command, &result, now))?;
    Ok(Ok(Appended::Written(result)))
}

/// Appends one job's events inside the batch transaction. The outer
/// `Result` is a database failure; the inner one is this append's own
/// outcome, decided before anything of it is written.
fn append_one(
    conn: &Connection,
    job: &AppendJob,
    check_ids_first: bool,
    recorded_at: i64,
) -> rusqlite::Result<Result<AppendResult, StoreError>> {
    let stream = find_stream(conn, &job.stream_id)?;
    let current = stream.map_or(0, |(_, version)| version);
    if check_ids_first || !job.expected.is_satisfied_by(current) {
        // Maybe a retry of an append that already happened (S3).
        match resolve_retry(conn, job, current)? {
            Ok(Some(original)) => return Ok(Ok(original)),
            Err(rejection) => return Ok(Err(rejection)),
            Ok(None) if !job.expected.is_satisfied_by(current) => {
                return Ok(Err(StoreError::Conflict {
                    stream_id: job.stream_id.clone(),
                    expected: job.expected,
                    actual: current,
                }))
            }
            Ok(None) => {}
        }
    }
    let stream_no = match stream {
        Some((stream_no, _)) => stream_no,
        None => create_stream(conn, &job.stream_id)?,
    };
    let (first_position, last_position) =
        insert_events(conn, job, stream_no, current, recorded_at)?;
    let last_version = current + job.events.len() as u64;
    conn.prepare_cached("UPDATE streams SET version = ?1 WHERE stream_no = ?2")?
        .execute(params![last_version as i64, stream_no])?;
    Ok(Ok(AppendResult {
        stream_id: job.stream_id.clone(),
        first_version: current + 1,
        last_version,
        first_position,
        last_position,
    }))
}

/// The stream's number and current version, if it exists.
fn find_stream(conn: &Connection, stream_id: &StreamId) -> rusqlite::Result<Option<(i64, u64)>> {
    conn.prepare_cached("SELECT stream_no, version FROM streams WHERE stream_id = ?1")?
        .query_row([stream_id.as_str()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .optional()
}

fn create_stream(conn: &Connection, stream_id: &StreamId) -> rusqlite::Result<i64> {
    conn.prepare_cached("INSERT INTO streams (stream_id, category, version) VALUES (?1, ?2, 0)")?
        .execute(params![stream_id.as_str(), stream_id.category()])?;
    Ok(conn.last_insert_rowid())
}

fn insert_events(
    conn: &Connection,
    job: &AppendJob,
    stream_no: i64,
    current: u64,
    recorded_at: i64,
) -> rusqlite::Result<(u64, u64)> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO events (stream_no, version, category, event_id, event_type, data, metadata, recorded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let category = job.stream_id.category();
    let mut first_position = 0;
    let mut last_position = 0;
    for (i, event) in job.events.iter().enumerate() {
        stmt.execute(params![
            stream_no,
            (current + 1 + i as u64) as i64,
            category,
            event.event_id.as_bytes().as_slice(),
            event.event_type,
            event.data,
            event.metadata,
            recorded_at,
        ])?;
        last_position = conn.last_insert_rowid() as u64;
        if i == 0 {
            first_position = last_position;
        }
    }
    Ok((first_position, last_position))
}

fn resolve_retry(
    conn: &Connection,
    job: &AppendJob,
    current: u64,
) -> rusqlite::Result<Result<Option<AppendResult>, StoreError>> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.stream_id, e.version, e.position, e.event_type, e.data, e.metadata
         FROM events e JOIN streams s ON s.stream_no = e.stream_no
         WHERE e.event_id = ?1",
    )?;
    let mut existing = Vec::with_capacity(job.events.len());
    for event in &job.events {
        let found = stmt
            .query_row([event.event_id.as_bytes().as_slice()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    StoredContent {
                        event_type: r.get(3)?,
                        data: r.get(4)?,
                        metadata: r.get(5)?,
                    },
                ))
            })
            .optional()?;
        existing.push(match found {
            Some((stream, version, position, content)) => match StreamId::new(stream) {
                Ok(stream_id) => Some(ExistingEvent {
                    stream_id,
                    version: version as u64,
                    position: position as u64,
                    content,
                }),
                Err(_) => {
                    return Ok(Err(StorageError::new(format!(
                        "stored event at position {position} has a corrupt stream id"
                    ))
                    .into()))
                }
            },
            None => None,
        });
    }
    Ok(resolve_duplicates(
        &job.stream_id,
        job.expected,
        current,
        &job.events,
        &existing,
    ))
}
