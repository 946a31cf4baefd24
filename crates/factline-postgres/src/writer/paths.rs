//! The ways a batch is written: one statement, pipelined statements, or
//! the slow path that decides every append under the head lock.

use super::*;

/// The fast path: `plan` was made relative to the head. `Ok(None)` means a
/// unique index refused the guess and nothing was committed.
#[allow(clippy::type_complexity)]
pub(super) async fn attempt_fast(
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
pub(super) async fn append_in_one(
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
pub(super) async fn attempt_pipelined(
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
pub(super) fn outcome_unknown(e: StorageError) -> StorageError {
    StorageError::new(format!(
        "{}; the appends may or may not have been committed, and retrying them with the same event ids is safe",
        e.message()
    ))
    .retryable()
}

/// How the slow path treats command keys in a batch.
pub(super) struct CommandRules {
    pub(super) now: DateTime<Utc>,
    pub(super) retention: Duration,
    /// Delete expired keys in this transaction.
    pub(super) purge: bool,
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn attempt_batch(
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
pub(super) async fn write_with_inline(
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
