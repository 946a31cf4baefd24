//! Parked events (P8) in PostgreSQL: the dead-letter table, retry and skip.

use super::*;

pub(super) async fn insert_parked(
    tx: &Transaction<'_>,
    table: &str,
    name: &str,
    version: u32,
    event: &RecordedEvent,
    error: &str,
    attempts: u32,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        &format!(
            "INSERT INTO {table}
                 (projection, version, position, stream_id, event_id, event_type, error, attempts, state, parked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'parked', now())
             ON CONFLICT (projection, version, position) DO UPDATE SET
                 error = excluded.error, attempts = excluded.attempts, state = 'parked'"
        ),
        &[
            &name,
            &(version as i32),
            &(event.position as i64),
            &event.stream_id.as_str(),
            &event.event_id.to_string(),
            &event.event_type,
            &error,
            &(attempts as i32),
        ],
    )
    .await
    .map(|_| ())
}

pub(super) async fn parked_events(
    client: &Client,
    table: &str,
    name: &str,
    version: u32,
) -> Result<Vec<ParkedEvent>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT position, stream_id, event_id, event_type, error, attempts, parked_at
                 FROM {table} WHERE projection = $1 AND version = $2 AND state = 'parked'
                 ORDER BY position"
            ),
            &[&name, &(version as i32)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ParkedEvent {
            position: r.get::<_, i64>(0) as u64,
            stream_id: r.get(1),
            event_id: r.get(2),
            event_type: r.get(3),
            error: r.get(4),
            attempts: r.get::<_, i32>(5) as u32,
            parked_at: r.get(6),
        })
        .collect())
}

pub(super) async fn skip_parked(
    client: &Client,
    table: &str,
    name: &str,
    version: u32,
    position: u64,
) -> Result<bool, tokio_postgres::Error> {
    let skipped = client
        .execute(
            &format!(
                "UPDATE {table} SET state = 'skipped'
                 WHERE projection = $1 AND version = $2 AND position = $3 AND state = 'parked'"
            ),
            &[&name, &(version as i32), &(position as i64)],
        )
        .await?;
    Ok(skipped > 0)
}

#[async_trait]
impl<P: PostgresProjection> Parking for PostgresSink<P> {
    async fn parked(&mut self) -> Result<Vec<ParkedEvent>, ProjectionError> {
        parked_events(
            &self.client,
            &self.parked_table,
            &self.name,
            self.tables.version(),
        )
        .await
        .map_err(|e| self.failed("listing parked events", e))
    }

    async fn skip(&mut self, position: u64) -> Result<bool, ProjectionError> {
        let (table, version) = (&self.parked_table, self.tables.version());
        let skipped = skip_parked(&self.client, table, &self.name, version, position)
            .await
            .map_err(|e| self.failed("skipping a parked event", e))?;
        self.held = None;
        Ok(skipped)
    }

    async fn retry(
        &mut self,
        store: &dyn factline_core::EventStore,
    ) -> Result<RetryReport, ProjectionError> {
        let parked = self.parked().await?;
        let events = crate::parking::fetch(store, &parked).await?;
        let version = self.tables.version() as i32;
        let mut report = RetryReport::default();
        let mut stuck: HashSet<String> = HashSet::new();
        for event in events.iter() {
            let stream = event.stream_id.to_string();
            if stuck.contains(&stream) {
                report.still_parked += 1;
                continue;
            }
            let name = self.name.clone();
            let fail = |context: &str, e| failure(&name, context, e);
            let tx = self
                .client
                .transaction()
                .await
                .map_err(|e| fail("starting a retry", e))?;
            match self.projection.apply(&tx, &self.tables, event).await {
                Ok(()) => {
                    tx.execute(
                        &format!(
                            "DELETE FROM {} WHERE projection = $1 AND version = $2 AND position = $3",
                            self.parked_table
                        ),
                        &[&name, &version, &(event.position as i64)],
                    )
                    .await
                    .map_err(|e| fail("releasing a parked event", e))?;
                    tx.commit()
                        .await
                        .map_err(|e| fail("committing a retry", e))?;
                    report.applied += 1;
                }
                Err(refusal) => {
                    drop(tx);
                    self.client
                        .execute(
                            &format!(
                                "UPDATE {} SET error = $4, attempts = attempts + 1
                                 WHERE projection = $1 AND version = $2 AND position = $3",
                                self.parked_table
                            ),
                            &[
                                &name,
                                &version,
                                &(event.position as i64),
                                &refusal.message(),
                            ],
                        )
                        .await
                        .map_err(|e| fail("recording a failed retry", e))?;
                    stuck.insert(stream);
                    report.still_parked += 1;
                }
            }
        }
        self.held = None;
        Ok(report)
    }
}
