//! Writing a plan's rows: events, streams and command keys in chunks, and
//! finding stored event ids when a retry must be told from a new append.

use super::*;

/// A unique index refused a row; the transaction was rolled back.
pub(super) struct Collision {
    /// It was an event id (else a stream id or stream version).
    pub(super) on_event_id: bool,
}

/// Sends `writes` with COMMIT right behind them in the pipeline (or, with a
/// commit gate, waits for the gate in between), and works out what the
/// server did.
pub(super) async fn commit_writes<T>(
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

pub(super) enum WriteFailure {
    Collided(Collision),
    /// The server refused a write: the transaction is aborted.
    Rejected(StorageError),
    /// No answer came (the connection failed).
    Lost(StorageError),
}

pub(super) fn write_failure(context: &str, e: tokio_postgres::Error) -> WriteFailure {
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
pub(super) enum Placement {
    Absolute,
    Relative,
}

/// Sends the plan's writes and awaits them all. They are pipelined with each
/// other (and, by the caller, with COMMIT): one round trip for all.
pub(super) async fn write_plan(
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
pub(super) struct CommandColumns<'a> {
    pub(super) key: Vec<&'a str>,
    pub(super) fingerprint: Vec<&'a str>,
    pub(super) stream_id: Vec<&'a str>,
    pub(super) first_version: Vec<i64>,
    pub(super) last_version: Vec<i64>,
    pub(super) first_position: Vec<i64>,
    pub(super) last_position: Vec<i64>,
    /// Comma-separated, one string per record (arrays of arrays do not
    /// `unnest` per row).
    pub(super) event_ids: Vec<String>,
}

impl<'a> CommandColumns<'a> {
    pub(super) fn new(records: &'a [CommandRecord]) -> Self {
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
pub(super) const INSERT_CHUNK_EVENTS: usize = 128;
pub(super) const FIRST_CHUNK_EVENTS: usize = 32;

/// One chunk of a plan's event columns.
pub(super) struct EventSlices<'p, 'a> {
    pub(super) position: &'p [i64],
    pub(super) stream_no: &'p [i64],
    pub(super) version: &'p [i64],
    pub(super) category: &'p [&'a str],
    pub(super) event_id: &'p [Uuid],
    pub(super) event_type: &'p [&'a str],
    pub(super) data: &'p [&'a str],
    pub(super) metadata: &'p [Option<&'a str>],
}

impl<'a> EventColumns<'a> {
    pub(super) fn slice(&self, range: std::ops::Range<usize>) -> EventSlices<'_, 'a> {
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

pub(super) async fn rollback(conn: &Connection) {
    // On a broken connection the server rolls back by itself.
    let _ = conn.client.execute(&conn.rollback, &[]).await;
}

/// Where each of the batch's event ids is already stored, if anywhere.
pub(super) async fn find_events(
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
