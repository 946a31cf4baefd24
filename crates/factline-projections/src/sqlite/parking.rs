//! Parked events (P8) in SQLite: the dead-letter table, retry and skip.

use super::*;

pub(super) fn held_streams(
    conn: &Connection,
    name: &str,
    version: u32,
) -> rusqlite::Result<HashSet<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT stream_id FROM factline_parked_events
         WHERE projection = ?1 AND version = ?2 AND state = 'parked'",
    )?;
    let streams = stmt.query_map(params![name, version], |r| r.get(0))?;
    streams.collect()
}

pub(super) fn insert_parked(
    conn: &Connection,
    name: &str,
    version: u32,
    event: &RecordedEvent,
    error: &str,
    attempts: u32,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO factline_parked_events
             (projection, version, position, stream_id, event_id, event_type, error, attempts, state, parked_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'parked', ?9)
         ON CONFLICT (projection, version, position) DO UPDATE SET
             error = excluded.error, attempts = excluded.attempts, state = 'parked'",
    )?
    .execute(params![
        name,
        version,
        event.position as i64,
        event.stream_id.as_str(),
        event.event_id.to_string(),
        event.event_type,
        error,
        attempts,
        chrono::Utc::now().timestamp_micros(),
    ])
    .map(|_| ())
}

pub(super) fn parked_counts(
    conn: &Connection,
    name: &str,
    version: u32,
) -> rusqlite::Result<(u64, u64)> {
    conn.query_row(
        "SELECT coalesce(sum(state = 'parked'), 0), coalesce(sum(state = 'skipped'), 0)
         FROM factline_parked_events WHERE projection = ?1 AND version = ?2",
        params![name, version],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
}

pub(super) fn parked_events(
    conn: &Connection,
    name: &str,
    version: u32,
) -> rusqlite::Result<Vec<ParkedEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT position, stream_id, event_id, event_type, error, attempts, parked_at
         FROM factline_parked_events
         WHERE projection = ?1 AND version = ?2 AND state = 'parked' ORDER BY position",
    )?;
    let rows = stmt.query_map(params![name, version], |r| {
        Ok(ParkedEvent {
            position: r.get::<_, i64>(0)? as u64,
            stream_id: r.get(1)?,
            event_id: r.get(2)?,
            event_type: r.get(3)?,
            error: r.get(4)?,
            attempts: r.get(5)?,
            parked_at: chrono::DateTime::from_timestamp_micros(r.get(6)?).unwrap_or_default(),
        })
    })?;
    rows.collect()
}

pub(super) fn skip_parked(
    conn: &Connection,
    name: &str,
    version: u32,
    position: u64,
) -> rusqlite::Result<bool> {
    conn.execute(
        "UPDATE factline_parked_events SET state = 'skipped'
         WHERE projection = ?1 AND version = ?2 AND position = ?3 AND state = 'parked'",
        params![name, version, position as i64],
    )
    .map(|n| n > 0)
}

#[async_trait]
impl<P: SqliteProjection> Parking for SqliteSink<P> {
    async fn parked(&mut self) -> Result<Vec<ParkedEvent>, ProjectionError> {
        let (name, version) = (self.name.clone(), self.tables.version());
        self.query(move |conn| parked_events(conn, &name, version))
            .await
    }

    async fn skip(&mut self, position: u64) -> Result<bool, ProjectionError> {
        let (name, version) = (self.name.clone(), self.tables.version());
        let skipped = self
            .query(move |conn| skip_parked(conn, &name, version, position))
            .await?;
        self.held = None;
        Ok(skipped)
    }

    async fn retry(
        &mut self,
        store: &dyn factline_core::EventStore,
    ) -> Result<RetryReport, ProjectionError> {
        let parked = self.parked().await?;
        let events = crate::parking::fetch(store, &parked).await?;
        let (name, tables) = (self.name.clone(), self.tables.clone());
        let report = self
            .with_parts(move |conn, projection| {
                let sql = read_model_failure(name.clone());
                let mut report = RetryReport::default();
                let mut stuck: HashSet<String> = HashSet::new();
                for event in events.iter() {
                    let stream = event.stream_id.to_string();
                    if stuck.contains(&stream) {
                        report.still_parked += 1;
                        continue;
                    }
                    let tx = conn
                        .transaction_with_behavior(TransactionBehavior::Immediate)
                        .map_err(&sql)?;
                    match projection.apply(&tx, &tables, event) {
                        Ok(()) => {
                            tx.execute(
                                "DELETE FROM factline_parked_events
                                 WHERE projection = ?1 AND version = ?2 AND position = ?3",
                                params![name, tables.version(), event.position as i64],
                            )
                            .map_err(&sql)?;
                            tx.commit().map_err(&sql)?;
                            report.applied += 1;
                        }
                        Err(refusal) => {
                            drop(tx);
                            conn.execute(
                                "UPDATE factline_parked_events SET error = ?4, attempts = attempts + 1
                                 WHERE projection = ?1 AND version = ?2 AND position = ?3",
                                params![name, tables.version(), event.position as i64, refusal.into_message()],
                            )
                            .map_err(&sql)?;
                            stuck.insert(stream);
                            report.still_parked += 1;
                        }
                    }
                }
                Ok(report)
            })
            .await?;
        self.held = None;
        Ok(report)
    }
}
