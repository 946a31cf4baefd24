//! Read models in PostgreSQL: the events' database or another.

mod portable;

use factline_core::{InlineError, StorageError};
use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use factline_core::RecordedEvent;
use tokio_postgres::{Client, NoTls, Transaction};

use crate::diff::{diff_sql, row_value, whole_table_sql, Dialect, Pair};
use crate::parking::Handling;
use crate::tables::{
    check_partitions, checkpoint_key, may_write, owned_events, Active, Mode, Partition, Tables,
};
use crate::{ApplyError, ProjectionError, Sink, VersionedSink};
use crate::{DiffReport, ParkedEvent, Parking, RetryReport, TableDiff};

/// A projection whose read model is in PostgreSQL.
#[async_trait]
pub trait PostgresProjection: Send + Sync + 'static {
    /// Unique among the projections of one read-model schema.
    fn name(&self) -> &str;

    /// The read model's version: a new one is built beside the active one
    /// by a rebuild, then swapped in.
    fn version(&self) -> u32 {
        1
    }

    /// The logical names of the tables it writes; readers query views of
    /// these names in the schema, writes go to [`Tables::get`].
    fn tables(&self) -> &[&str];

    /// Creates this version's tables if they are missing. Runs in the
    /// first batch's transaction of every run.
    async fn setup(
        &mut self,
        tx: &Transaction<'_>,
        tables: &Tables,
    ) -> Result<(), tokio_postgres::Error>;

    /// Applies one event inside the batch's transaction.
    async fn apply(
        &mut self,
        tx: &Transaction<'_>,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ApplyError>;

    /// Applies a run of events in order (by default one by one). An
    /// implementation may pipeline their statements; on failure it names
    /// the event that failed.
    async fn apply_all(
        &mut self,
        tx: &Transaction<'_>,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), (u64, ApplyError)> {
        for event in events {
            self.apply(tx, tables, event)
                .await
                .map_err(|e| (event.position, e))?;
        }
        Ok(())
    }
}

/// Commits a [`PostgresProjection`]'s batches to its read-model database,
/// one transaction per batch with the checkpoint, which lives in
/// `<schema>.projection_checkpoints`.
pub struct PostgresSink<P> {
    name: String,
    client: Client,
    projection: P,
    checkpoints: String,
    versions: String,
    parked_table: String,
    paused_sql: String,
    tables: Tables,
    mode: Mode,
    set_up: bool,
    /// Streams with parked events: their later events are held back.
    held: Option<HashSet<String>>,
    partition: Option<Partition>,
    /// The checkpoint as this sink last read or wrote it.
    seen: Option<u64>,
    lease: Lease,
    schema: String,
    /// Every batch's own statements, prepared once per connection: an
    /// unprepared one costs a second round trip.
    prepared: Option<BatchStatements>,
}

struct BatchStatements {
    lock_active: tokio_postgres::Statement,
    paused: tokio_postgres::Statement,
    save_checkpoint: tokio_postgres::Statement,
    move_checkpoint: tokio_postgres::Statement,
}

/// Whether a sink takes its projection's lease before it writes (P12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lease {
    Unused,
    Wanted,
    Held,
}

/// How often a standby runner tries to take the lease.
const LEASE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

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

    async fn connect_in(
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

    fn failed(&self, context: &str, e: tokio_postgres::Error) -> ProjectionError {
        failure(&self.name, context, e)
    }
}

#[async_trait]
impl<P: PostgresProjection> VersionedSink for PostgresSink<P> {
    async fn swap(&mut self, keep_old: bool) -> Result<Option<u32>, ProjectionError> {
        let name = self.name.clone();
        let fail = |context: &str, e| failure(&name, context, e);
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| fail("starting the swap", e))?;
        let old = lock_active(&tx, &self.versions, &name)
            .await
            .map_err(|e| fail("reading the active version", e))?;
        let old_logical = old.as_ref().map_or(&[][..], |a| &a.tables[..]);
        for statement in self.tables.repoint_views(old_logical) {
            tx.execute(&statement, &[])
                .await
                .map_err(|e| fail("re-pointing the views", e))?;
        }
        register(&tx, &self.versions, &name, &self.tables)
            .await
            .map_err(|e| fail("registering the version", e))?;
        if let Some(old) = old.as_ref().filter(|o| o.version != self.tables.version()) {
            if !keep_old {
                for statement in self
                    .tables
                    .at_version(old.version, &old.tables)
                    .drop_tables()
                {
                    tx.execute(&statement, &[])
                        .await
                        .map_err(|e| fail("dropping the old version", e))?;
                }
                tx.execute(
                    &format!(
                        "DELETE FROM {} WHERE {VERSION_CHECKPOINTS}",
                        self.checkpoints
                    ),
                    &[&checkpoint_key(&name, old.version, None)],
                )
                .await
                .map_err(|e| fail("dropping the old checkpoint", e))?;
            }
        }
        tx.commit()
            .await
            .map_err(|e| fail("committing the swap", e))?;
        self.mode = Mode::Live;
        Ok(old.map(|o| o.version))
    }

    async fn diff(&mut self, samples: usize) -> Result<DiffReport, ProjectionError> {
        diff_tables(
            &self.client,
            &self.versions,
            &self.name,
            &self.tables,
            samples,
        )
        .await
        .map_err(|e| self.failed("comparing the versions", e))
    }

    async fn discard(&mut self) -> Result<(), ProjectionError> {
        let name = self.name.clone();
        let fail = |context: &str, e| failure(&name, context, e);
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| fail("starting the discard", e))?;
        let active = lock_active(&tx, &self.versions, &name)
            .await
            .map_err(|e| fail("reading the active version", e))?;
        if active.is_some_and(|a| a.version == self.tables.version()) {
            return Err(ProjectionError::Invalid {
                projection: name.clone(),
                message: format!(
                    "version {} is the active one and cannot be discarded",
                    self.tables.version()
                ),
            });
        }
        for statement in self.tables.drop_tables() {
            tx.execute(&statement, &[])
                .await
                .map_err(|e| fail("dropping the version", e))?;
        }
        tx.execute(
            &format!(
                "DELETE FROM {} WHERE {VERSION_CHECKPOINTS}",
                self.checkpoints
            ),
            &[&checkpoint_key(&name, self.tables.version(), None)],
        )
        .await
        .map_err(|e| fail("dropping the checkpoint", e))?;
        tx.commit()
            .await
            .map_err(|e| fail("committing the discard", e))
    }
}

/// The active version, with its registry row locked exclusively until the
/// transaction ends, so a swap or discard and a batch of the old version
/// cannot interleave. (Batches take the row shared, with a prepared
/// statement of their own: partitions of one projection may commit side by
/// side.)
async fn lock_active(
    tx: &Transaction<'_>,
    versions: &str,
    name: &str,
) -> Result<Option<Active>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            &format!("SELECT active_version, tables FROM {versions} WHERE name = $1 FOR UPDATE"),
            &[&name],
        )
        .await?;
    Ok(row.map(|r| Active::parse(i64::from(r.get::<_, i32>(0)), r.get(1))))
}

async fn register(
    tx: &(impl tokio_postgres::GenericClient + Sync),
    versions: &str,
    name: &str,
    tables: &Tables,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        &format!(
            "INSERT INTO {versions} (name, active_version, tables, swapped_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (name) DO UPDATE SET active_version = excluded.active_version,
                 tables = excluded.tables, swapped_at = excluded.swapped_at"
        ),
        &[
            &name,
            &(tables.version() as i32),
            &Active::tables_text(tables.logical()),
        ],
    )
    .await
    .map(|_| ())
}

fn failure(name: &str, context: &str, e: tokio_postgres::Error) -> ProjectionError {
    if is_transient(&e) {
        return ProjectionError::Transient {
            projection: name.to_owned(),
            message: format!("{context}: {}", describe(&e)),
        };
    }
    ProjectionError::read_model(name, factline_postgres::sql::storage_error(context, e))
}

pub(crate) use factline_postgres::sql::describe;
/// A deadlock or serialization failure: the server aborted the
/// transaction, and the same one may succeed when run again.
pub(crate) use factline_postgres::sql::is_aborted_by_server as is_transient;

/// The checkpoint rows of one version (`$1`, its unpartitioned key): one,
/// or one per partition.
const VERSION_CHECKPOINTS: &str = "(name = $1 OR starts_with(name, $1 || '#'))";

/// A projection's refusal of an event; a deadlock or serialization
/// failure behind it is no refusal and is run again.
fn refused(name: &str, position: u64, refusal: ApplyError) -> ProjectionError {
    let projection = name.to_owned();
    match refusal.is_transient() {
        true => ProjectionError::Transient {
            projection,
            message: refusal.into_message(),
        },
        false => ProjectionError::Apply {
            projection,
            position,
            message: refusal.into_message(),
        },
    }
}

/// How often a batch the server aborted (deadlock, serialization failure)
/// is run again before the runner is told.
const TRANSIENT_ATTEMPTS: u32 = 8;

fn save_checkpoint_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (name, position, updated_at) VALUES ($1, $2, now())
         ON CONFLICT (name) DO UPDATE SET position = excluded.position,
                                          updated_at = excluded.updated_at"
    )
}

/// Moves a checkpoint only from where the sink last saw it (`$3`), so two
/// runners of one projection can never both apply a batch: the second
/// waits on the row (or on the first's insert) and then finds it moved.
fn move_checkpoint_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} AS c (name, position, updated_at) VALUES ($1, $2, now())
         ON CONFLICT (name) DO UPDATE SET position = excluded.position,
                                          updated_at = excluded.updated_at
         WHERE c.position = $3"
    )
}

/// The tables every read-model schema has: checkpoints, parked events,
/// versions and controls.
fn read_model_ddl(schema: &str) -> String {
    let checkpoints = format!("\"{schema}\".projection_checkpoints");
    format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE IF NOT EXISTS {checkpoints} (
                 name       text        PRIMARY KEY,
                 position   bigint      NOT NULL,
                 updated_at timestamptz NOT NULL
             );
             CREATE TABLE IF NOT EXISTS \"{schema}\".projection_parked_events (
                 projection text        NOT NULL,
                 version    integer     NOT NULL,
                 position   bigint      NOT NULL,
                 stream_id  text        NOT NULL,
                 event_id   text        NOT NULL,
                 event_type text        NOT NULL,
                 error      text        NOT NULL,
                 attempts   integer     NOT NULL,
                 state      text        NOT NULL,
                 parked_at  timestamptz NOT NULL,
                 PRIMARY KEY (projection, version, position)
             );
             CREATE TABLE IF NOT EXISTS \"{schema}\".projection_versions (
                 name           text        PRIMARY KEY,
                 active_version integer     NOT NULL,
                 tables         text        NOT NULL,
                 swapped_at     timestamptz NOT NULL
             );
             CREATE TABLE IF NOT EXISTS \"{schema}\".projection_controls (
                 name       text        PRIMARY KEY,
                 paused     boolean     NOT NULL,
                 updated_at timestamptz NOT NULL
             );"
    )
}

/// A connection named after `name`, with `<schema>.projection_checkpoints`
/// created if missing; returns the client and the table's quoted name.
async fn connect_with_checkpoints(
    url: &str,
    schema: &str,
    name: &str,
) -> Result<(Client, String), ProjectionError> {
    let failed = |message: String| ProjectionError::read_model(name, StorageError::new(message));
    let schema_ok = !schema.is_empty()
        && schema.len() <= 50
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with(|c: char| c.is_ascii_digit());
    if !schema_ok {
        return Err(ProjectionError::invalid(
            name,
            format!("schema name {schema:?} must be 1 to 50 lower-case letters, digits or _"),
        ));
    }
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| failed(format!("invalid PostgreSQL connection string: {e}")))?;
    config.application_name(format!("factline projection {name}"));
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        ProjectionError::read_model(
            name,
            factline_postgres::sql::storage_error("connecting the read model", e),
        )
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "projection connection ended");
        }
    });
    let checkpoints = format!("\"{schema}\".projection_checkpoints");
    client
        .batch_execute(&read_model_ddl(schema))
        .await
        .or_else(|e| {
            // Two runners creating the table at once: one wins.
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                Ok(())
            } else {
                Err(ProjectionError::read_model(
                    name,
                    factline_postgres::sql::storage_error("creating the checkpoint table", e),
                ))
            }
        })?;
    Ok((client, checkpoints))
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
    async fn held_streams(&self) -> Result<HashSet<String>, ProjectionError> {
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
    async fn write_batch(
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
    async fn write_batch_once(
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

/// Upserts a row of a read model kept outside the projection's
/// transaction (P2): the row carries `last_position`, and the write wins
/// only when `position` is newer than the row's, so replays and reordered
/// deliveries never overwrite newer state. Returns whether it won.
///
/// `key` and `values` are (column, value) pairs; the table needs a unique
/// key over the `key` columns and a `last_position bigint` column. `table`
/// may be schema-qualified (`read.orders`).
pub async fn upsert_if_newer<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    table: &str,
    key: &[(&str, &(dyn tokio_postgres::types::ToSql + Sync))],
    values: &[(&str, &(dyn tokio_postgres::types::ToSql + Sync))],
    position: u64,
) -> Result<bool, ApplyError> {
    let sql = crate::upsert_sql(table, key, values, |n| format!("${n}"))?;
    let position = position as i64;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        key.iter().chain(values).map(|(_, v)| *v).collect();
    params.push(&position);
    Ok(client.execute(&sql, &params).await? > 0)
}

/// Reactor checkpoints in PostgreSQL (`<schema>.projection_checkpoints`,
/// the table projections use).
pub struct PostgresCheckpoints {
    client: Client,
    table: String,
}

impl PostgresCheckpoints {
    /// Connects to the database at `url` and keeps the checkpoints in `schema`.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, ProjectionError> {
        let (client, table) = connect_with_checkpoints(url, schema, "reactor checkpoints").await?;
        Ok(PostgresCheckpoints { client, table })
    }
}

#[async_trait]
impl crate::Checkpoints for PostgresCheckpoints {
    async fn load(&self, name: &str) -> Result<Option<u64>, ProjectionError> {
        let row = self
            .client
            .query_opt(
                &format!("SELECT position FROM {} WHERE name = $1", self.table),
                &[&name],
            )
            .await
            .map_err(|e| failure(name, "reading the checkpoint", e))?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    async fn save(&self, name: &str, position: u64) -> Result<(), ProjectionError> {
        self.client
            .execute(
                &save_checkpoint_sql(&self.table),
                &[&name, &(position as i64)],
            )
            .await
            .map(|_| ())
            .map_err(|e| failure(name, "saving the checkpoint", e))
    }
}

const POSTGRES: Dialect = Dialect {
    same: |a, b| format!("{a} IS NOT DISTINCT FROM {b}"),
    row_json: |alias, columns| {
        let fields: Vec<String> = columns
            .iter()
            .map(|c| format!("'{c}', {alias}.{c}"))
            .collect();
        format!("json_build_object({})::text", fields.join(", "))
    },
};

/// A table's columns and primary key (both empty when it does not exist).
///
/// (`indkey` is an `int2vector`, whose subscripts start at 0: hence the
/// `+ 1` that keeps 0 for "not in the key".)
async fn columns(
    client: &Client,
    table: &str,
) -> Result<(Vec<String>, Vec<String>), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, coalesce(array_position(i.indkey::int2[], a.attnum) + 1, 0)
             FROM pg_attribute a
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&table],
        )
        .await?;
    let mut key: Vec<(i32, String)> = rows
        .iter()
        .filter(|r| r.get::<_, i32>(1) > 0)
        .map(|r| (r.get(1), r.get(0)))
        .collect();
    key.sort();
    Ok((
        rows.iter().map(|r| r.get(0)).collect(),
        key.into_iter().map(|(_, c)| c).collect(),
    ))
}

async fn diff_tables(
    client: &Client,
    versions: &str,
    name: &str,
    tables: &Tables,
    samples: usize,
) -> Result<DiffReport, tokio_postgres::Error> {
    let active = client
        .query_opt(
            &format!("SELECT active_version, tables FROM {versions} WHERE name = $1"),
            &[&name],
        )
        .await?
        .map(|r| Active::parse(i64::from(r.get::<_, i32>(0)), r.get(1)));
    let old_tables = active
        .as_ref()
        .map(|a| tables.at_version(a.version, &a.tables));
    let mut logical: Vec<String> = tables.logical().to_vec();
    for t in old_tables.iter().flat_map(|o| o.logical()) {
        if !logical.contains(t) {
            logical.push(t.clone());
        }
    }
    let count = |sql: String| async move {
        client
            .query_one(&sql, &[])
            .await
            .map(|r| r.get::<_, i64>(0) as u64)
    };
    let rows = |sql: String| async move {
        let rows = client.query(&sql, &[]).await?;
        Ok::<_, tokio_postgres::Error>(
            rows.iter()
                .map(|r| row_value(r.get::<_, &str>(0)))
                .collect::<Vec<_>>(),
        )
    };
    let mut report = DiffReport {
        active: active.as_ref().map(|a| a.version),
        candidate: tables.version(),
        tables: Vec::new(),
    };
    for table in logical {
        let new = tables.get(&table);
        let old = old_tables.as_ref().map(|o| o.get(&table));
        let (new_columns, key) = columns(client, &new).await?;
        let (old_columns, _) = match &old {
            Some(old) => columns(client, old).await?,
            None => (Vec::new(), Vec::new()),
        };
        let mut diff = TableDiff {
            table: table.clone(),
            added: 0,
            removed: 0,
            changed: 0,
            added_samples: Vec::new(),
            removed_samples: Vec::new(),
            changed_samples: Vec::new(),
        };
        match (old_columns.is_empty(), new_columns.is_empty()) {
            (true, true) => {}
            (true, false) => {
                let (n, sample) = whole_table_sql(&POSTGRES, &new, &new_columns, samples);
                diff.added = count(n).await?;
                diff.added_samples = rows(sample).await?;
            }
            (false, true) => {
                let old = old.as_deref().unwrap_or_default();
                let (n, sample) = whole_table_sql(&POSTGRES, old, &old_columns, samples);
                diff.removed = count(n).await?;
                diff.removed_samples = rows(sample).await?;
            }
            (false, false) => {
                let pair = Pair {
                    old: old.as_deref().unwrap_or_default(),
                    new: &new,
                    key,
                    old_columns,
                    new_columns,
                };
                let sql = diff_sql(&POSTGRES, &pair, samples);
                diff.added = count(sql.added_count).await?;
                diff.added_samples = rows(sql.added_rows).await?;
                diff.removed = count(sql.removed_count).await?;
                diff.removed_samples = rows(sql.removed_rows).await?;
                diff.changed = count(sql.changed_count).await?;
                diff.changed_samples = client
                    .query(&sql.changed_rows, &[])
                    .await?
                    .iter()
                    .map(|r| (row_value(r.get(0)), row_value(r.get(1))))
                    .collect();
            }
        }
        report.tables.push(diff);
    }
    Ok(report)
}

async fn insert_parked(
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

async fn parked_events(
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

async fn skip_parked(
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

/// Operators' view of the projections in a PostgreSQL read-model schema,
/// and pausing and resuming them from any process.
pub struct PostgresAdmin {
    client: Client,
    schema: String,
}

impl PostgresAdmin {
    /// Connects to the read-model schema `schema` of the database at `url`.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, ProjectionError> {
        let (client, _) = connect_with_checkpoints(url, schema, "admin").await?;
        Ok(PostgresAdmin {
            client,
            schema: schema.to_owned(),
        })
    }

    /// Every projection with a checkpoint or a registered version.
    pub async fn projections(&self) -> Result<Vec<crate::ProjectionInfo>, ProjectionError> {
        let s = &self.schema;
        let fail = |e| failure("admin", "listing the projections", e);
        let query = |sql: String| async move { self.client.query(&sql, &[]).await };
        let (registry, checkpoints, controls, parked) = tokio::try_join!(
            query(format!(
                "SELECT name, active_version FROM \"{s}\".projection_versions"
            )),
            query(format!(
                "SELECT name, position, updated_at FROM \"{s}\".projection_checkpoints"
            )),
            query(format!(
                "SELECT name, paused FROM \"{s}\".projection_controls"
            )),
            query(format!(
                "SELECT projection, version, count(*) FILTER (WHERE state = 'parked'),
                        count(*) FILTER (WHERE state = 'skipped')
                 FROM \"{s}\".projection_parked_events GROUP BY projection, version"
            )),
        )
        .map_err(fail)?;
        let rows = crate::admin::Rows {
            registry: registry
                .iter()
                .map(|r| (r.get(0), r.get::<_, i32>(1) as u32))
                .collect(),
            checkpoints: checkpoints
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as u64, Some(r.get(2))))
                .collect(),
            controls: controls.iter().map(|r| (r.get(0), r.get(1))).collect(),
            parked: parked
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        r.get::<_, i32>(1) as u32,
                        r.get::<_, i64>(2) as u64,
                        r.get::<_, i64>(3) as u64,
                    )
                })
                .collect(),
        };
        Ok(rows.gather())
    }

    async fn active_version(&self, name: &str) -> Result<Option<u32>, ProjectionError> {
        let s = &self.schema;
        let row = self
            .client
            .query_opt(
                &format!("SELECT active_version FROM \"{s}\".projection_versions WHERE name = $1"),
                &[&name],
            )
            .await
            .map_err(|e| failure(name, "reading the active version", e))?;
        Ok(row.map(|r| r.get::<_, i32>(0) as u32))
    }

    /// The parked events of `name`'s active version.
    pub async fn parked(&self, name: &str) -> Result<Vec<ParkedEvent>, ProjectionError> {
        let Some(version) = self.active_version(name).await? else {
            return Ok(Vec::new());
        };
        let table = format!("\"{}\".projection_parked_events", self.schema);
        parked_events(&self.client, &table, name, version)
            .await
            .map_err(|e| failure(name, "listing parked events", e))
    }

    /// Skips the parked event at `position` of `name`'s active version;
    /// false when no such event is parked. A runner of the projection
    /// releases its stream when it next starts or retries.
    pub async fn skip(&self, name: &str, position: u64) -> Result<bool, ProjectionError> {
        let Some(version) = self.active_version(name).await? else {
            return Ok(false);
        };
        let table = format!("\"{}\".projection_parked_events", self.schema);
        skip_parked(&self.client, &table, name, version, position)
            .await
            .map_err(|e| failure(name, "skipping a parked event", e))
    }

    /// Pauses or resumes `name` in every process that runs it. It takes the
    /// registry row exclusively first, so it waits for a batch in progress,
    /// and every later batch sees it: no batch commits after a pause
    /// returns.
    pub async fn set_paused(&mut self, name: &str, paused: bool) -> Result<(), ProjectionError> {
        crate::validate_name(name)?;
        let s = self.schema.clone();
        let fail = |e| failure(name, "pausing or resuming", e);
        let tx = self.client.transaction().await.map_err(fail)?;
        tx.execute(
            &format!("SELECT 1 FROM \"{s}\".projection_versions WHERE name = $1 FOR UPDATE"),
            &[&name],
        )
        .await
        .map_err(fail)?;
        tx.execute(
            &format!(
                "INSERT INTO \"{s}\".projection_controls (name, paused, updated_at)
                 VALUES ($1, $2, now())
                 ON CONFLICT (name) DO UPDATE SET paused = excluded.paused,
                                                  updated_at = excluded.updated_at"
            ),
            &[&name, &paused],
        )
        .await
        .map_err(fail)?;
        tx.commit().await.map_err(fail)
    }
}

/// A [`SqlProjection`](crate::SqlProjection) updated by the PostgreSQL
/// store's writer in each append's own transaction (C6): connect the store
/// with `PostgresStore::connect_with_inline(config,
/// vec![Box::new(PostgresInline::new(p, "read")?)])`. Its read model is in
/// `schema` of the events' database, is never behind the log, and shows in
/// the admin view like any projection. A refused event fails the append
/// that brought it; nothing of that append is written.
///
/// Its statements run on the writer's connection, unprepared (they must
/// survive the writer reconnecting), batch by batch
/// (`batch_statements`) or event by event.
pub struct PostgresInline<P> {
    name: String,
    schema: String,
    tables: Tables,
    projection: P,
    set_up: bool,
    /// The checkpoint as last read or written in the writer's transaction.
    seen: Option<u64>,
}

impl<P: crate::SqlProjection> PostgresInline<P> {
    /// An inline projection writing to tables in `schema`, in the append's transaction.
    pub fn new(projection: P, schema: &str) -> Result<Self, ProjectionError> {
        let name = projection.name().to_owned();
        crate::validate_name(&name)?;
        let tables = Tables::new(
            &name,
            Some(schema),
            projection.version(),
            projection.tables(),
        )?;
        Ok(PostgresInline {
            name,
            schema: schema.to_owned(),
            tables,
            projection,
            set_up: false,
            seen: None,
        })
    }

    /// Creates the tables, and on the first build the views and the
    /// registry row, inside the writer's transaction.
    async fn set_up(&mut self, client: &Client) -> Result<(), InlineError> {
        let s = &self.schema;
        let text = |e: tokio_postgres::Error| {
            InlineError::Failed(factline_postgres::sql::storage_error("setting up", e))
        };
        for ddl in self
            .projection
            .create_tables_for(crate::Dialect::Postgres, &self.tables)
        {
            client.batch_execute(&ddl).await.map_err(text)?;
        }
        let active = client
            .query_opt(
                &format!("SELECT active_version FROM \"{s}\".projection_versions WHERE name = $1"),
                &[&self.name],
            )
            .await
            .map_err(text)?
            .map(|r| r.get::<_, i32>(0) as u32);
        match active {
            Some(v) if v == self.tables.version() => {}
            Some(v) => {
                return Err(InlineError::Failed(StorageError::new(format!(
                    "version {v} is the active one, not {}: rebuild it with the new code first",
                    self.tables.version()
                ))))
            }
            None => {
                for statement in self.tables.repoint_views(&[]) {
                    client.batch_execute(&statement).await.map_err(text)?;
                }
                let versions = format!("\"{s}\".projection_versions");
                register(client, &versions, &self.name, &self.tables)
                    .await
                    .map_err(text)?;
            }
        }
        self.set_up = true;
        Ok(())
    }

    /// Runs the projection's statements for the event at `position`: a
    /// failure that may pass fails the batch, any other (a constraint of
    /// its tables) is the projection refusing the event.
    async fn run(
        &self,
        client: &Client,
        position: u64,
        statements: &[crate::Statement],
    ) -> Result<(), InlineError> {
        for statement in statements {
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = statement
                .params
                .iter()
                .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            client
                .execute(statement.sql.as_str(), &params)
                .await
                .map_err(|e| match factline_postgres::sql::is_transient(&e) {
                    true => InlineError::Failed(factline_postgres::sql::storage_error(
                        "the inline read model",
                        e,
                    )),
                    false => InlineError::refused(position, describe(&e)),
                })?;
        }
        Ok(())
    }
}

#[async_trait]
impl<P: crate::SqlProjection> factline_postgres::InlineProjection for PostgresInline<P> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn checkpoint(&mut self, client: &Client) -> Result<u64, InlineError> {
        let failed =
            |e| InlineError::Failed(factline_postgres::sql::storage_error("the checkpoint", e));
        if !self.set_up {
            client
                .batch_execute(&read_model_ddl(&self.schema))
                .await
                .map_err(failed)?;
        }
        let key = checkpoint_key(&self.name, self.tables.version(), None);
        let row = client
            .query_opt(
                &format!(
                    "SELECT position FROM \"{}\".projection_checkpoints WHERE name = $1",
                    self.schema
                ),
                &[&key],
            )
            .await
            .map_err(failed)?;
        let at = row.map_or(0, |r| r.get::<_, i64>(0) as u64);
        self.seen = Some(at);
        Ok(at)
    }

    async fn apply(
        &mut self,
        client: &Client,
        events: &[RecordedEvent],
    ) -> Result<(), InlineError> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(());
        };
        let (first, last) = (first.position, last.position);
        if !self.set_up {
            self.set_up(client).await?;
        }
        match self
            .projection
            .batch_statements(crate::Dialect::Postgres, &self.tables, events)
        {
            Some(statements) => {
                let statements =
                    statements.map_err(|e| InlineError::refused(first, e.into_message()))?;
                self.run(client, first, &statements).await?;
            }
            None => {
                for event in events {
                    let statements = self
                        .projection
                        .statements(&self.tables, event)
                        .map_err(|e| InlineError::refused(event.position, e.into_message()))?;
                    self.run(client, event.position, &statements).await?;
                }
            }
        }
        let key = checkpoint_key(&self.name, self.tables.version(), None);
        let table = format!("\"{}\".projection_checkpoints", self.schema);
        let seen = self.seen.unwrap_or(0) as i64;
        let moved = client
            .execute(&move_checkpoint_sql(&table), &[&key, &(last as i64), &seen])
            .await
            .map_err(|e| {
                InlineError::Failed(factline_postgres::sql::storage_error(
                    "moving the checkpoint",
                    e,
                ))
            })?;
        if moved == 0 {
            return Err(InlineError::Failed(StorageError::new(
                "its checkpoint moved outside the writer",
            )));
        }
        self.seen = Some(last);
        Ok(())
    }

    fn rolled_back(&mut self) {
        self.set_up = false;
        self.seen = None;
    }
}
