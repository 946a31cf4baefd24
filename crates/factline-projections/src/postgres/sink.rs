//! The sink a `Runner` commits batches through on PostgreSQL: rows and
//! checkpoint in one transaction.

use super::*;

/// Commits a [`PostgresProjection`]'s batches to its read-model database,
/// one transaction per batch with the checkpoint, which lives in
/// `<schema>.projection_checkpoints`.
pub struct PostgresSink<P> {
    pub(super) name: String,
    pub(super) client: Client,
    pub(super) projection: P,
    pub(super) checkpoints: String,
    pub(super) versions: String,
    pub(super) parked_table: String,
    pub(super) paused_sql: String,
    pub(super) tables: Tables,
    pub(super) mode: Mode,
    pub(super) set_up: bool,
    /// Streams with parked events: their later events are held back.
    pub(super) held: Option<HashSet<String>>,
    pub(super) partition: Option<Partition>,
    /// The checkpoint as this sink last read or wrote it.
    pub(super) seen: Option<u64>,
    pub(super) lease: Lease,
    pub(super) schema: String,
    /// Every batch's own statements, prepared once per connection: an
    /// unprepared one costs a second round trip.
    pub(super) prepared: Option<BatchStatements>,
}

pub(super) struct BatchStatements {
    pub(super) lock_active: tokio_postgres::Statement,
    pub(super) paused: tokio_postgres::Statement,
    pub(super) save_checkpoint: tokio_postgres::Statement,
    pub(super) move_checkpoint: tokio_postgres::Statement,
}

/// Whether a sink takes its projection's lease before it writes (P12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lease {
    Unused,
    Wanted,
    Held,
}

/// How often a standby runner tries to take the lease.
pub(super) const LEASE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

impl<P: PostgresProjection> PostgresSink<P> {
    /// Connects to the read-model database at `url` and keeps checkpoints
    /// in `schema` (created if missing). It may be the event store's own
    /// database.
    pub async fn connect(url: &str, schema: &str, projection: P) -> Result<Self, ProjectionError> {
        Self::connect_in(url, schema, projection, Mode::Live).await
    }

    /// Connects to build the projection's version beside the active one;
    /// [`VersionedSink::swap`] makes it active.
    pub async fn connect_rebuild(
        url: &str,
        schema: &str,
        projection: P,
    ) -> Result<Self, ProjectionError> {
        Self::connect_in(url, schema, projection, Mode::Rebuild).await
    }

    pub(super) async fn connect_in(
        url: &str,
        schema: &str,
        projection: P,
        mode: Mode,
    ) -> Result<Self, ProjectionError> {
        let name = projection.name().to_owned();
        crate::validate_name(&name)?;
        let (client, checkpoints) = connect_with_checkpoints(url, schema, &name).await?;
        // A batch commits its rows and its checkpoint together, so a commit
        // lost in a crash is replayed from the older checkpoint: read models
        // need no flush per commit (SQLite sinks use synchronous=NORMAL for
        // the same reason). Reactor checkpoints keep their flushes.
        client
            .batch_execute("SET synchronous_commit = off")
            .await
            .map_err(|e| failure(&name, "configuring the connection", e))?;
        let tables = Tables::new(
            &name,
            Some(schema),
            projection.version(),
            projection.tables(),
        )?;
        if let Some(fingerprint) = projection.fingerprint() {
            check_definition(&client, schema, &name, tables.version(), &fingerprint).await?;
        }
        Ok(PostgresSink {
            name,
            client,
            projection,
            checkpoints,
            versions: format!("\"{schema}\".projection_versions"),
            parked_table: format!("\"{schema}\".projection_parked_events"),
            paused_sql: format!(
                "SELECT paused FROM \"{schema}\".projection_controls WHERE name = $1"
            ),
            tables,
            mode,
            set_up: false,
            held: None,
            partition: None,
            seen: None,
            lease: Lease::Unused,
            schema: schema.to_owned(),
            prepared: None,
        })
    }

    /// Takes the projection's lease (of its version and partition) before
    /// the first batch, so that of several processes running the same
    /// projection one applies events and the others stand by (P12).
    ///
    /// The lease is a session advisory lock on the connection the batches
    /// are written through: only the owner's session can write, and when
    /// the owner dies its connection closes, the server releases the lock
    /// at once, and a standby takes over within `LEASE_POLL`. A lost
    /// connection loses the lease and fails the runner, never two owners.
    pub fn with_lease(mut self) -> Self {
        self.lease = Lease::Wanted;
        self
    }

    /// Waits until this sink holds its lease (at once without
    /// [`Self::with_lease`]). The runner calls it before it reads the
    /// checkpoint; call it first to know when this process took over.
    pub async fn acquire_lease(&mut self) -> Result<(), ProjectionError> {
        if self.lease != Lease::Wanted {
            return Ok(());
        }
        let key = checkpoint_key(&self.name, self.tables.version(), self.partition);
        loop {
            let row = self
                .client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))",
                    &[&self.schema, &key],
                )
                .await
                .map_err(|e| self.failed("taking the lease", e))?;
            if row.get::<_, bool>(0) {
                self.lease = Lease::Held;
                tracing::info!(projection = %self.name, lease = %key, "took the lease");
                return Ok(());
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }

    /// Whether this sink holds its projection's lease.
    pub fn holds_lease(&self) -> bool {
        self.lease == Lease::Held
    }

    /// Runs as one partition of the projection (P10): applies only the
    /// events of its streams, with a checkpoint of its own. Partitions may
    /// commit side by side; a batch the server aborts because two of them
    /// deadlocked is run again.
    pub fn with_partition(mut self, partition: Partition) -> Self {
        self.partition = Some(partition);
        self
    }

    /// The tables this sink writes.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// The read-model connection, for queries between batches.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The projection it runs.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    pub(super) fn failed(&self, context: &str, e: tokio_postgres::Error) -> ProjectionError {
        failure(&self.name, context, e)
    }
}

#[async_trait]
impl<P: PostgresProjection> Sink for PostgresSink<P> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn checkpoint(&mut self) -> Result<u64, ProjectionError> {
        self.acquire_lease().await?;
        let row = self
            .client
            .query_opt(
                &format!("SELECT position FROM {} WHERE name = $1", self.checkpoints),
                &[&checkpoint_key(
                    &self.name,
                    self.tables.version(),
                    self.partition,
                )],
            )
            .await
            .map_err(|e| self.failed("reading the checkpoint", e))?;
        let position = row.map_or(0, |r| r.get::<_, i64>(0) as u64);
        self.seen = Some(position);
        let sole_writer = self.partition.is_none();
        self.projection.resuming(position, sole_writer);
        Ok(position)
    }

    async fn apply_batch(&mut self, events: Arc<[RecordedEvent]>) -> Result<u64, ProjectionError> {
        self.write_batch(events, Handling::Apply).await
    }

    async fn park(
        &mut self,
        event: RecordedEvent,
        error: &str,
        attempts: u32,
    ) -> Result<(), ProjectionError> {
        let stream = event.stream_id.to_string();
        let handling = Handling::Park {
            error: error.to_owned(),
            attempts,
        };
        self.write_batch(Arc::from([event]), handling).await?;
        self.held.get_or_insert_with(HashSet::new).insert(stream);
        Ok(())
    }

    async fn parked_counts(&mut self) -> Result<(u64, u64), ProjectionError> {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE state = 'parked'), count(*) FILTER (WHERE state = 'skipped')
                     FROM {} WHERE projection = $1 AND version = $2",
                    self.parked_table
                ),
                &[&self.name, &(self.tables.version() as i32)],
            )
            .await
            .map_err(|e| self.failed("counting parked events", e))?;
        Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
    }
}

impl<P: PostgresProjection> PostgresSink<P> {
    pub(super) async fn held_streams(&self) -> Result<HashSet<String>, ProjectionError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT DISTINCT stream_id FROM {}
                     WHERE projection = $1 AND version = $2 AND state = 'parked'",
                    self.parked_table
                ),
                &[&self.name, &(self.tables.version() as i32)],
            )
            .await
            .map_err(|e| self.failed("reading parked streams", e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// [`Self::write_batch_once`], run again (with a short, growing pause)
    /// while the server aborts it as a deadlock or serialization failure.
    pub(super) async fn write_batch(
        &mut self,
        events: Arc<[RecordedEvent]>,
        handling: Handling,
    ) -> Result<u64, ProjectionError> {
        let mut attempt = 1;
        loop {
            match self
                .write_batch_once(events.clone(), handling.clone())
                .await
            {
                Err(ProjectionError::Transient { message, .. }) if attempt < TRANSIENT_ATTEMPTS => {
                    tracing::debug!(projection = %self.name, attempt, error = %message, "batch aborted by the server; running it again");
                    // A little randomness, so partitions that deadlocked do not
                    // meet again in step.
                    let pause = 5 * u64::from(attempt) + fastrand::u64(0..10);
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One transaction: the registry check, setup, the events (applied,
    /// held back, or parked), and the checkpoint.
    /// Returns how many events were parked.
    pub(super) async fn write_batch_once(
        &mut self,
        batch: Arc<[RecordedEvent]>,
        handling: Handling,
    ) -> Result<u64, ProjectionError> {
        let Some(last) = batch.last().map(|e| e.position as i64) else {
            return Ok(0);
        };
        // A partition applies only its own streams' events; the checkpoint
        // still moves past the others'.
        let events = owned_events(self.partition, &batch);
        if self.held.is_none() {
            self.held = Some(self.held_streams().await?);
        }
        if self.prepared.is_none() {
            let client = &self.client;
            let prepare = |sql: String| async move { client.prepare(&sql).await };
            let (lock_active, paused, save_checkpoint, move_checkpoint) = tokio::try_join!(
                prepare(format!(
                    "SELECT active_version, tables FROM {} WHERE name = $1 FOR SHARE",
                    self.versions
                )),
                prepare(self.paused_sql.clone()),
                prepare(save_checkpoint_sql(&self.checkpoints)),
                prepare(move_checkpoint_sql(&self.checkpoints)),
            )
            .map_err(|e| self.failed("preparing the batch statements", e))?;
            self.prepared = Some(BatchStatements {
                lock_active,
                paused,
                save_checkpoint,
                move_checkpoint,
            });
        }
        let (name, set_up) = (self.name.clone(), self.set_up);
        let key = checkpoint_key(&name, self.tables.version(), self.partition);
        let tx = self.client.transaction().await.map_err(|e| {
            ProjectionError::read_model(
                name.clone(),
                factline_postgres::sql::storage_error("starting a batch", e),
            )
        })?;
        let fail = |context: &str, e: tokio_postgres::Error| failure(&name, context, e);
        if !set_up {
            // Partitions set up one at a time, each seeing what the one
            // before registered (CREATE … IF NOT EXISTS races with itself).
            tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&name])
                .await
                .map_err(|e| fail("waiting for the setup lock", e))?;
        }
        let Some(statements) = self.prepared.as_ref() else {
            return Err(ProjectionError::read_model(
                name,
                StorageError::new("the batch statements are not prepared"),
            ));
        };
        // Checked in every batch, under a lock on the registry row: a swap
        // by another runner or process stops this version from writing.
        // The pause is read after it (the server runs the pipeline in
        // order): a pause that holds the lock exclusively is committed and
        // seen here.
        let by_name: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&name];
        let (active, paused) = tokio::join!(
            tx.query_opt(&statements.lock_active, &by_name),
            tx.query_opt(&statements.paused, &by_name),
        );
        let active = active
            .map_err(|e| fail("reading the active version", e))?
            .map(|r| Active::parse(i64::from(r.get::<_, i32>(0)), r.get(1)));
        let paused = paused
            .map_err(|e| fail("reading whether it is paused", e))?
            .is_some_and(|r| r.get::<_, bool>(0));
        if paused {
            return Err(ProjectionError::Paused { projection: name });
        }
        let first_build = may_write(&name, self.mode, self.tables.version(), active.as_ref())?;
        if !set_up {
            // Partitions all run as the same number.
            let keys: Vec<String> = tx
                .query(
                    &format!(
                        "SELECT name FROM {} WHERE {VERSION_CHECKPOINTS}",
                        self.checkpoints
                    ),
                    &[&checkpoint_key(&name, self.tables.version(), None)],
                )
                .await
                .map_err(|e| fail("reading the checkpoints", e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            check_partitions(&name, self.tables.version(), self.partition, &keys)?;
        }
        if !set_up || first_build {
            self.projection
                .setup(&tx, &self.tables)
                .await
                .map_err(|e| fail("setting up the read model", e))?;
        }
        if first_build {
            for statement in self.tables.repoint_views(&[]) {
                tx.execute(&statement, &[])
                    .await
                    .map_err(|e| fail("creating the views", e))?;
            }
            register(&tx, &self.versions, &name, &self.tables)
                .await
                .map_err(|e| fail("registering the version", e))?;
        }
        let held = self.held.as_ref();
        let mut parked = 0;
        let holds_any =
            held.is_some_and(|h| events.iter().any(|e| h.contains(e.stream_id.as_str())));
        let one_by_one = holds_any || !matches!(handling, Handling::Apply);
        if !one_by_one {
            // Nothing to park: the whole batch in one go (pipelined by
            // projections that can).
            if let Err((position, refusal)) =
                self.projection.apply_all(&tx, &self.tables, &events).await
            {
                return Err(refused(&name, position, refusal));
            }
        }
        let singly: &[RecordedEvent] = if one_by_one { &events } else { &[] };
        for event in singly {
            let stream = event.stream_id.as_str();
            let park = match &handling {
                Handling::Park { error, attempts } => Some((error.clone(), *attempts)),
                // Per-stream order: nothing of a stream passes its parked
                // event.
                Handling::Apply if held.is_some_and(|h| h.contains(stream)) => Some((
                    format!("held back behind a parked event of stream {stream}"),
                    0,
                )),
                Handling::Apply => None,
            };
            match park {
                Some((error, attempts)) => {
                    insert_parked(
                        &tx,
                        &self.parked_table,
                        &name,
                        self.tables.version(),
                        event,
                        &error,
                        attempts,
                    )
                    .await
                    .map_err(|e| fail("parking an event", e))?;
                    parked += 1;
                }
                None => {
                    if let Err(refusal) = self.projection.apply(&tx, &self.tables, event).await {
                        // Dropping the transaction rolls the batch back.
                        return Err(refused(&name, event.position, refusal));
                    }
                }
            }
        }
        let moved = match self.seen {
            Some(seen) => {
                tx.execute(&statements.move_checkpoint, &[&key, &last, &(seen as i64)])
                    .await
            }
            None => {
                tx.execute(&statements.save_checkpoint, &[&key, &last])
                    .await
            }
        }
        .map_err(|e| fail("moving the checkpoint", e))?;
        if moved == 0 {
            let found = tx
                .query_one(
                    &format!("SELECT position FROM {} WHERE name = $1", self.checkpoints),
                    &[&key],
                )
                .await
                .map_err(|e| fail("reading the checkpoint", e))?
                .get::<_, i64>(0) as u64;
            let expected = self.seen.take().unwrap_or(0);
            return Err(ProjectionError::Contended {
                projection: name.clone(),
                expected,
                found,
            });
        }
        tx.commit()
            .await
            .map_err(|e| fail("committing a batch", e))?;
        self.set_up = true;
        self.seen = Some(last as u64);
        Ok(parked)
    }
}
