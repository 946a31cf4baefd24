//! Read models in a SQLite file: the same file as the events or another.

mod portable;

use factline_core::{InlineError, StorageError};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_core::RecordedEvent;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::diff::{diff_sql, row_value, whole_table_sql, Dialect, Pair};
use crate::parking::Handling;
use crate::tables::{
    check_partitions, checkpoint_key, may_write, owned_events, Active, Mode, Partition, Tables,
};
use crate::{ApplyError, ProjectionError, Sink, VersionedSink};
use crate::{DiffReport, ParkedEvent, Parking, RetryReport, TableDiff};

/// A projection whose read model is in SQLite.
pub trait SqliteProjection: Send + 'static {
    /// Unique among the projections of one read-model database.
    fn name(&self) -> &str;

    /// The read model's version: a new one is built beside the active one
    /// by a rebuild, then swapped in.
    fn version(&self) -> u32 {
        1
    }

    /// The logical names of the tables it writes; readers query views of
    /// these names, writes go to [`Tables::get`].
    fn tables(&self) -> &[&str];

    /// Creates this version's tables if they are missing. Runs in the
    /// first batch's transaction of every run.
    fn setup(&mut self, tx: &Transaction<'_>, tables: &Tables) -> rusqlite::Result<()>;

    /// Applies one event inside the batch's transaction.
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ApplyError>;

    /// Applies a run of events with nothing to park among them; an
    /// implementation may do them together (set-based statements); on
    /// failure it names the event that failed (or the run's first).
    fn apply_all(
        &mut self,
        tx: &Transaction<'_>,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), (u64, ApplyError)> {
        for event in events {
            self.apply(tx, tables, event)
                .map_err(|e| (event.position, e))?;
        }
        Ok(())
    }
}

/// The checkpoints of every projection in a read-model file.
const CHECKPOINTS: &str = "CREATE TABLE IF NOT EXISTS factline_projection_checkpoints (
    name       TEXT    PRIMARY KEY,
    position   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS factline_projection_versions (
    name           TEXT    PRIMARY KEY,
    active_version INTEGER NOT NULL,
    tables         TEXT    NOT NULL,
    swapped_at     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS factline_parked_events (
    projection TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    position   INTEGER NOT NULL,
    stream_id  TEXT    NOT NULL,
    event_id   TEXT    NOT NULL,
    event_type TEXT    NOT NULL,
    error      TEXT    NOT NULL,
    attempts   INTEGER NOT NULL,
    state      TEXT    NOT NULL,
    parked_at  INTEGER NOT NULL,
    PRIMARY KEY (projection, version, position)
);
CREATE TABLE IF NOT EXISTS factline_projection_controls (
    name       TEXT    PRIMARY KEY,
    paused     INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
)";

const SAVE_CHECKPOINT: &str =
    "INSERT INTO factline_projection_checkpoints (name, position, updated_at)
     VALUES (?1, ?2, ?3)
     ON CONFLICT (name) DO UPDATE SET position = excluded.position,
                                      updated_at = excluded.updated_at";

/// Moves a checkpoint only from where this sink last saw it (`?4`), so two
/// runners of one projection can never both apply a batch.
const MOVE_CHECKPOINT: &str =
    "INSERT INTO factline_projection_checkpoints (name, position, updated_at)
     VALUES (?1, ?2, ?3)
     ON CONFLICT (name) DO UPDATE SET position = excluded.position,
                                      updated_at = excluded.updated_at
     WHERE factline_projection_checkpoints.position = ?4";

/// Commits a [`SqliteProjection`]'s batches to its read-model file, one
/// transaction per batch with the checkpoint.
pub struct SqliteSink<P> {
    name: String,
    path: PathBuf,
    tables: Tables,
    mode: Mode,
    /// Taken while a batch runs on a blocking thread.
    parts: Option<(Connection, P)>,
    set_up: bool,
    /// Streams with parked events: their later events are held back.
    held: Option<Arc<HashSet<String>>>,
    partition: Option<Partition>,
    /// The checkpoint as this sink last read or wrote it.
    seen: Option<u64>,
}

impl<P: SqliteProjection> SqliteSink<P> {
    /// Opens (creating if needed) the read-model file at `path` to keep the
    /// projection's active version up to date. It may be the event store's
    /// own file. The first build of a projection makes its version active.
    pub fn open(path: impl AsRef<Path>, projection: P) -> Result<Self, ProjectionError> {
        Self::open_in(path.as_ref(), projection, Mode::Live)
    }

    /// Opens the read-model file to build the projection's version beside
    /// the active one; [`VersionedSink::swap`] makes it active.
    pub fn open_rebuild(path: impl AsRef<Path>, projection: P) -> Result<Self, ProjectionError> {
        Self::open_in(path.as_ref(), projection, Mode::Rebuild)
    }

    fn open_in(path: &Path, projection: P, mode: Mode) -> Result<Self, ProjectionError> {
        let name = projection.name().to_owned();
        crate::validate_name(&name)?;
        let tables = Tables::new(&name, None, projection.version(), projection.tables())?;
        let path = path.to_path_buf();
        let failed = |e: rusqlite::Error| {
            let context = format!("opening {}", path.display());
            ProjectionError::read_model(
                name.clone(),
                factline_sqlite::sql::storage_error(&context, e),
            )
        };
        factline_core::backend::create_private_file(&path).map_err(|e| {
            let context = format!("creating {}", path.display());
            ProjectionError::read_model(name.clone(), StorageError::with_source(context, e))
        })?;
        let conn = Connection::open(&path).map_err(&failed)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(&failed)?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .map_err(&failed)?;
        // A commit lost to a power cut is replayed from the older
        // checkpoint: read model and checkpoint move together.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(&failed)?;
        // A batch's pages stay in memory until its commit (32 MiB).
        conn.pragma_update(None, "cache_size", -32_768)
            .map_err(&failed)?;
        conn.execute_batch(CHECKPOINTS).map_err(&failed)?;
        Ok(SqliteSink {
            name,
            path,
            tables,
            mode,
            parts: Some((conn, projection)),
            set_up: false,
            held: None,
            partition: None,
            seen: None,
        })
    }

    /// Runs as one partition of the projection (P10): applies only the
    /// events of its streams, with a checkpoint of its own.
    pub fn with_partition(mut self, partition: Partition) -> Self {
        self.partition = Some(partition);
        self
    }

    /// The tables this sink writes.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// The projection, between batches.
    pub fn projection(&self) -> Option<&P> {
        self.parts.as_ref().map(|(_, p)| p)
    }

    /// Runs `query` on the read-model connection (between batches).
    pub async fn query<T: Send + 'static>(
        &mut self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, ProjectionError> {
        let failed = read_model_failure(self.name.clone());
        self.with_parts(move |conn, _| query(conn).map_err(failed))
            .await
    }

    /// Runs `work` on the connection and projection on a blocking thread,
    /// and takes them back.
    async fn with_parts<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut Connection, &mut P) -> Result<T, ProjectionError> + Send + 'static,
    ) -> Result<T, ProjectionError> {
        let lost = || {
            ProjectionError::read_model(
                self.name.clone(),
                StorageError::new(format!(
                    "the connection to {} was lost when a batch panicked",
                    self.path.display()
                )),
            )
        };
        let (mut conn, mut projection) = self.parts.take().ok_or_else(lost)?;
        let (parts, result) = tokio::task::spawn_blocking(move || {
            let result = work(&mut conn, &mut projection);
            ((conn, projection), result)
        })
        .await
        .map_err(|e| {
            ProjectionError::read_model(
                self.name.clone(),
                StorageError::with_source("a batch panicked", e),
            )
        })?;
        self.parts = Some(parts);
        result
    }
}

/// Wraps a failure of the read model's SQLite database for `projection`,
/// keeping the driver's error and whether it may pass.
fn read_model_failure(projection: String) -> impl Fn(rusqlite::Error) -> ProjectionError {
    move |e| {
        ProjectionError::read_model(
            projection.clone(),
            factline_sqlite::sql::storage_error("the read model", e),
        )
    }
}

/// How a batch on the blocking thread ended.
enum BatchEnd {
    /// With how many events parked.
    Committed(u64),
    /// The projection refused the event at this position.
    Refused(u64, ApplyError),
    /// The registry forbids this version to write.
    Forbidden(ProjectionError),
    /// An operator paused the projection.
    Paused,
    /// Another runner moved the checkpoint to this position.
    Contended(u64),
}

fn stored_checkpoint(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT position FROM factline_projection_checkpoints WHERE name = ?1")?
        .query_row([key], |r| r.get::<_, i64>(0))
        .optional()
        .map(|p| p.unwrap_or(0) as u64)
}

/// The checkpoint rows of one version: one, or one per partition.
const VERSION_CHECKPOINTS: &str = "name = ?1 OR substr(name, 1, length(?1) + 1) = ?1 || '#'";

fn version_checkpoints(
    conn: &Connection,
    name: &str,
    version: u32,
) -> rusqlite::Result<Vec<String>> {
    let sql =
        format!("SELECT name FROM factline_projection_checkpoints WHERE {VERSION_CHECKPOINTS}");
    let mut stmt = conn.prepare_cached(&sql)?;
    let keys = stmt.query_map([checkpoint_key(name, version, None)], |r| r.get(0))?;
    keys.collect()
}

fn delete_checkpoints(conn: &Connection, name: &str, version: u32) -> rusqlite::Result<()> {
    let sql = format!("DELETE FROM factline_projection_checkpoints WHERE {VERSION_CHECKPOINTS}");
    conn.execute(&sql, [checkpoint_key(name, version, None)])
        .map(|_| ())
}

fn is_paused(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT paused FROM factline_projection_controls WHERE name = ?1")?
        .query_row([name], |r| r.get::<_, bool>(0))
        .optional()
        .map(|p| p.unwrap_or(false))
}

fn active_version(conn: &Connection, name: &str) -> rusqlite::Result<Option<Active>> {
    conn.query_row(
        "SELECT active_version, tables FROM factline_projection_versions WHERE name = ?1",
        [name],
        |r| Ok(Active::parse(r.get(0)?, &r.get::<_, String>(1)?)),
    )
    .optional()
}

fn register(conn: &Connection, name: &str, tables: &Tables) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO factline_projection_versions (name, active_version, tables, swapped_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET active_version = excluded.active_version,
             tables = excluded.tables, swapped_at = excluded.swapped_at",
        params![
            name,
            tables.version(),
            Active::tables_text(tables.logical()),
            chrono::Utc::now().timestamp_micros()
        ],
    )
    .map(|_| ())
}

#[async_trait]
impl<P: SqliteProjection> Sink for SqliteSink<P> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn checkpoint(&mut self) -> Result<u64, ProjectionError> {
        let key = checkpoint_key(&self.name, self.tables.version(), self.partition);
        let position = self
            .query(move |conn| stored_checkpoint(conn, &key))
            .await?;
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
        let mut held = self.held.as_deref().cloned().unwrap_or_default();
        held.insert(stream);
        self.held = Some(Arc::new(held));
        Ok(())
    }

    async fn parked_counts(&mut self) -> Result<(u64, u64), ProjectionError> {
        let (name, version) = (self.name.clone(), self.tables.version());
        self.query(move |conn| parked_counts(conn, &name, version))
            .await
    }
}

/// What one batch needs besides its events and the projection.
struct Batch<'a> {
    name: &'a str,
    mode: Mode,
    tables: &'a Tables,
    partition: Option<Partition>,
    /// The checkpoint as the sink last saw it.
    seen: Option<u64>,
    set_up: bool,
    /// Streams held back behind a parked event.
    held: &'a HashSet<String>,
    /// Run by the store's writer in the append's transaction: no pause, no
    /// parking.
    inline: bool,
}

impl Batch<'_> {
    /// Everything of a batch but the commit, inside `tx`: the registry
    /// check, setup, the events (applied, held back, or parked), and the
    /// checkpoint. `Committed` means ready to commit.
    fn write<P: SqliteProjection>(
        &self,
        tx: &Transaction<'_>,
        projection: &mut P,
        events: &[RecordedEvent],
        handling: &Handling,
    ) -> rusqlite::Result<BatchEnd> {
        let (name, tables, partition) = (self.name, self.tables, self.partition);
        // Checked in every batch: a swap by another runner or process
        // stops this version from writing at once.
        let active = active_version(tx, name)?;
        if !self.inline && is_paused(tx, name)? {
            return Ok(BatchEnd::Paused);
        }
        let first_build = match may_write(name, self.mode, tables.version(), active.as_ref()) {
            Ok(first) => first,
            Err(forbidden) => return Ok(BatchEnd::Forbidden(forbidden)),
        };
        if !self.set_up {
            let keys = version_checkpoints(tx, name, tables.version())?;
            if let Err(mismatch) = check_partitions(name, tables.version(), partition, &keys) {
                return Ok(BatchEnd::Forbidden(mismatch));
            }
        }
        if !self.set_up || first_build {
            projection.setup(tx, tables)?;
        }
        if first_build {
            for statement in tables.repoint_views(&[]) {
                tx.execute(&statement, [])?;
            }
            register(tx, name, tables)?;
        }
        let mut parked = 0;
        // A partition applies only its own streams' events; the checkpoint
        // still moves past the others'.
        let owned = owned_events(partition, events);
        let holds_any = owned
            .iter()
            .any(|e| self.held.contains(e.stream_id.as_str()));
        let one_by_one = holds_any || !matches!(handling, Handling::Apply);
        if !one_by_one {
            // Nothing to park: the whole run in one go.
            if let Err((position, refusal)) = projection.apply_all(tx, tables, &owned) {
                return Ok(BatchEnd::Refused(position, refusal));
            }
        }
        let singly: &[RecordedEvent] = if one_by_one { &owned } else { &[] };
        for event in singly {
            let stream = event.stream_id.as_str();
            let park = match handling {
                Handling::Park { error, attempts } => Some((error.clone(), *attempts)),
                // Per-stream order: nothing of a stream passes its parked
                // event.
                Handling::Apply if self.held.contains(stream) => Some((
                    format!("held back behind a parked event of stream {stream}"),
                    0,
                )),
                Handling::Apply => None,
            };
            match park {
                Some((error, attempts)) => {
                    insert_parked(tx, name, tables.version(), event, &error, attempts)?;
                    parked += 1;
                }
                None => {
                    if let Err(refusal) = projection.apply(tx, tables, event) {
                        // Dropping the transaction rolls the batch back.
                        return Ok(BatchEnd::Refused(event.position, refusal));
                    }
                }
            }
        }
        let last = events.last().map_or(0, |e| e.position);
        let key = checkpoint_key(name, tables.version(), partition);
        let now = chrono::Utc::now().timestamp_micros();
        let moved = match self.seen {
            Some(seen) => tx.execute(MOVE_CHECKPOINT, params![key, last as i64, now, seen as i64]),
            None => tx.execute(SAVE_CHECKPOINT, params![key, last as i64, now]),
        }?;
        if moved == 0 {
            return Ok(BatchEnd::Contended(stored_checkpoint(tx, &key)?));
        }
        Ok(BatchEnd::Committed(parked))
    }
}

impl<P: SqliteProjection> SqliteSink<P> {
    /// One transaction: the registry check, setup, the events (applied,
    /// held back, or parked), and the checkpoint.
    /// Returns how many events were parked.
    async fn write_batch(
        &mut self,
        events: Arc<[RecordedEvent]>,
        handling: Handling,
    ) -> Result<u64, ProjectionError> {
        let held = match &self.held {
            Some(held) => held.clone(),
            None => {
                let (name, version) = (self.name.clone(), self.tables.version());
                let held = Arc::new(
                    self.query(move |conn| held_streams(conn, &name, version))
                        .await?,
                );
                self.held = Some(held.clone());
                held
            }
        };
        let (name, set_up, mode) = (self.name.clone(), self.set_up, self.mode);
        let (tables, partition, seen) = (self.tables.clone(), self.partition, self.seen);
        let last = events.last().map(|e| e.position);
        let end = self
            .with_parts(move |conn, projection| {
                let sql = read_model_failure(name.clone());
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(&sql)?;
                let batch = Batch {
                    name: &name,
                    mode,
                    tables: &tables,
                    partition,
                    seen,
                    set_up,
                    held: &held,
                    inline: false,
                };
                let end = batch
                    .write(&tx, projection, &events, &handling)
                    .map_err(&sql)?;
                if matches!(end, BatchEnd::Committed(_)) {
                    tx.commit().map_err(&sql)?;
                }
                Ok(end)
            })
            .await?;
        match end {
            BatchEnd::Committed(parked) => {
                self.set_up = true;
                self.seen = last.or(self.seen);
                Ok(parked)
            }
            BatchEnd::Contended(found) => {
                let expected = self.seen.unwrap_or(0);
                self.seen = None;
                Err(ProjectionError::Contended {
                    projection: self.name.clone(),
                    expected,
                    found,
                })
            }
            BatchEnd::Refused(position, refusal) => Err(ProjectionError::Apply {
                projection: self.name.clone(),
                position,
                message: refusal.into_message(),
            }),
            BatchEnd::Forbidden(forbidden) => Err(forbidden),
            BatchEnd::Paused => Err(ProjectionError::Paused {
                projection: self.name.clone(),
            }),
        }
    }
}

#[async_trait]
impl<P: SqliteProjection> VersionedSink for SqliteSink<P> {
    async fn swap(&mut self, keep_old: bool) -> Result<Option<u32>, ProjectionError> {
        let (name, tables) = (self.name.clone(), self.tables.clone());
        let old = self
            .with_parts(move |conn, _| {
                let sql = read_model_failure(name.clone());
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(&sql)?;
                let old = active_version(&tx, &name).map_err(&sql)?;
                let old_logical = old.as_ref().map_or(&[][..], |a| &a.tables[..]);
                for statement in tables.repoint_views(old_logical) {
                    tx.execute(&statement, []).map_err(&sql)?;
                }
                register(&tx, &name, &tables).map_err(&sql)?;
                if let Some(old) = old.as_ref().filter(|o| o.version != tables.version()) {
                    if !keep_old {
                        let old_tables = tables.at_version(old.version, &old.tables);
                        for statement in old_tables.drop_tables() {
                            tx.execute(&statement, []).map_err(&sql)?;
                        }
                        delete_checkpoints(&tx, &name, old.version).map_err(&sql)?;
                    }
                }
                tx.commit().map_err(&sql)?;
                Ok(old.map(|o| o.version))
            })
            .await?;
        self.mode = Mode::Live;
        Ok(old)
    }

    async fn diff(&mut self, samples: usize) -> Result<DiffReport, ProjectionError> {
        let (name, tables) = (self.name.clone(), self.tables.clone());
        self.with_parts(move |conn, _| {
            diff_tables(conn, &name, &tables, samples).map_err(read_model_failure(name.clone()))
        })
        .await
    }

    async fn discard(&mut self) -> Result<(), ProjectionError> {
        let (name, tables) = (self.name.clone(), self.tables.clone());
        self.with_parts(move |conn, _| {
            let sql = read_model_failure(name.clone());
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(&sql)?;
            let active = active_version(&tx, &name).map_err(&sql)?;
            if active.is_some_and(|a| a.version == tables.version()) {
                return Err(ProjectionError::invalid(
                    name,
                    format!(
                        "version {} is the active one and cannot be discarded",
                        tables.version()
                    ),
                ));
            }
            for statement in tables.drop_tables() {
                tx.execute(&statement, []).map_err(&sql)?;
            }
            delete_checkpoints(&tx, &name, tables.version()).map_err(&sql)?;
            tx.commit().map_err(&sql)
        })
        .await
    }
}

/// Upserts a row of a read model kept outside the projection's
/// transaction (P2): the row carries `last_position`, and the write wins
/// only when `position` is newer than the row's, so replays and reordered
/// deliveries never overwrite newer state. Returns whether it won.
///
/// `key` and `values` are (column, value) pairs; the table needs a unique
/// key over the `key` columns and a `last_position INTEGER` column.
pub fn upsert_if_newer(
    conn: &Connection,
    table: &str,
    key: &[(&str, &dyn rusqlite::ToSql)],
    values: &[(&str, &dyn rusqlite::ToSql)],
    position: u64,
) -> rusqlite::Result<bool> {
    let sql = crate::upsert_sql(table, key, values, |n| format!("?{n}"))
        .map_err(|e| rusqlite::Error::InvalidParameterName(e.to_string()))?;
    let position = position as i64;
    let mut params: Vec<&dyn rusqlite::ToSql> = key.iter().chain(values).map(|(_, v)| *v).collect();
    params.push(&position);
    conn.prepare_cached(&sql)?
        .execute(params.as_slice())
        .map(|changed| changed > 0)
}

/// Reactor checkpoints in a SQLite file (the table projections use).
pub struct SqliteCheckpoints {
    conn: std::sync::Arc<std::sync::Mutex<Connection>>,
}

impl SqliteCheckpoints {
    /// Opens (creating if needed) the checkpoints table in the SQLite file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ProjectionError> {
        let path = path.as_ref();
        let failed = |e: rusqlite::Error| {
            let context = format!("opening {}", path.display());
            ProjectionError::read_model(
                "reactor checkpoints",
                factline_sqlite::sql::storage_error(&context, e),
            )
        };
        factline_core::backend::create_private_file(path).map_err(|e| {
            let context = format!("creating {}", path.display());
            ProjectionError::read_model(
                "reactor checkpoints",
                StorageError::with_source(context, e),
            )
        })?;
        let conn = Connection::open(path).map_err(&failed)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(&failed)?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .map_err(&failed)?;
        conn.execute_batch(CHECKPOINTS).map_err(&failed)?;
        Ok(SqliteCheckpoints {
            conn: std::sync::Arc::new(std::sync::Mutex::new(conn)),
        })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        name: &str,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, ProjectionError> {
        let conn = self.conn.clone();
        let failed = |source: StorageError| ProjectionError::read_model(name, source);
        tokio::task::spawn_blocking(move || {
            let conn = conn
                .lock()
                .map_err(|_| StorageError::new("the checkpoint connection was poisoned"))?;
            work(&conn).map_err(|e| factline_sqlite::sql::storage_error("the checkpoints", e))
        })
        .await
        .map_err(|e| failed(StorageError::with_source("a checkpoint task failed", e)))?
        .map_err(failed)
    }
}

#[async_trait]
impl crate::Checkpoints for SqliteCheckpoints {
    async fn load(&self, name: &str) -> Result<Option<u64>, ProjectionError> {
        let key = name.to_owned();
        self.with_conn(name, move |conn| {
            conn.query_row(
                "SELECT position FROM factline_projection_checkpoints WHERE name = ?1",
                [&key],
                |r| r.get::<_, i64>(0).map(|p| p as u64),
            )
            .optional()
        })
        .await
    }

    async fn save(&self, name: &str, position: u64) -> Result<(), ProjectionError> {
        let key = name.to_owned();
        self.with_conn(name, move |conn| {
            conn.execute(
                SAVE_CHECKPOINT,
                params![key, position as i64, chrono::Utc::now().timestamp_micros()],
            )
            .map(|_| ())
        })
        .await
    }
}

const SQLITE: Dialect = Dialect {
    same: |a, b| format!("{a} IS {b}"),
    row_json: |alias, columns| {
        let fields: Vec<String> = columns
            .iter()
            .map(|c| format!("'{c}', {alias}.{c}"))
            .collect();
        format!("json_object({})", fields.join(", "))
    },
};

/// A table's columns and primary key (both empty when it does not exist).
fn columns(conn: &Connection, table: &str) -> rusqlite::Result<(Vec<String>, Vec<String>)> {
    let mut stmt = conn.prepare("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")?;
    let rows: Vec<(String, i64)> = stmt
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut key: Vec<(i64, String)> = rows
        .iter()
        .filter(|(_, pk)| *pk > 0)
        .map(|(c, pk)| (*pk, c.clone()))
        .collect();
    key.sort();
    Ok((
        rows.into_iter().map(|(c, _)| c).collect(),
        key.into_iter().map(|(_, c)| c).collect(),
    ))
}

fn diff_tables(
    conn: &Connection,
    name: &str,
    tables: &Tables,
    samples: usize,
) -> rusqlite::Result<DiffReport> {
    let active = active_version(conn, name)?;
    let old_tables = active
        .as_ref()
        .map(|a| tables.at_version(a.version, &a.tables));
    let mut logical: Vec<String> = tables.logical().to_vec();
    for t in old_tables.iter().flat_map(|o| o.logical()) {
        if !logical.contains(t) {
            logical.push(t.clone());
        }
    }
    let count = |sql: &str| {
        conn.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
    };
    let rows = |sql: &str| -> rusqlite::Result<Vec<serde_json::Value>> {
        let mut stmt = conn.prepare(sql)?;
        let texts: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(texts.iter().map(|t| row_value(t)).collect())
    };
    let mut report = DiffReport {
        active: active.as_ref().map(|a| a.version),
        candidate: tables.version(),
        tables: Vec::new(),
    };
    for table in logical {
        let new = tables.get(&table);
        let old = old_tables.as_ref().map(|o| o.get(&table));
        let (new_columns, key) = columns(conn, &new)?;
        let (old_columns, _) = match &old {
            Some(old) => columns(conn, old)?,
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
                let (n, sample) = whole_table_sql(&SQLITE, &new, &new_columns, samples);
                diff.added = count(&n)?;
                diff.added_samples = rows(&sample)?;
            }
            (false, true) => {
                let old = old.as_deref().unwrap_or_default();
                let (n, sample) = whole_table_sql(&SQLITE, old, &old_columns, samples);
                diff.removed = count(&n)?;
                diff.removed_samples = rows(&sample)?;
            }
            (false, false) => {
                let pair = Pair {
                    old: old.as_deref().unwrap_or_default(),
                    new: &new,
                    key,
                    old_columns,
                    new_columns,
                };
                let sql = diff_sql(&SQLITE, &pair, samples);
                diff.added = count(&sql.added_count)?;
                diff.added_samples = rows(&sql.added_rows)?;
                diff.removed = count(&sql.removed_count)?;
                diff.removed_samples = rows(&sql.removed_rows)?;
                diff.changed = count(&sql.changed_count)?;
                let mut stmt = conn.prepare(&sql.changed_rows)?;
                diff.changed_samples = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                    .map(|pair| pair.map(|(a, b)| (row_value(&a), row_value(&b))))
                    .collect::<Result<_, _>>()?;
            }
        }
        report.tables.push(diff);
    }
    Ok(report)
}

fn held_streams(conn: &Connection, name: &str, version: u32) -> rusqlite::Result<HashSet<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT stream_id FROM factline_parked_events
         WHERE projection = ?1 AND version = ?2 AND state = 'parked'",
    )?;
    let streams = stmt.query_map(params![name, version], |r| r.get(0))?;
    streams.collect()
}

fn insert_parked(
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

fn parked_counts(conn: &Connection, name: &str, version: u32) -> rusqlite::Result<(u64, u64)> {
    conn.query_row(
        "SELECT coalesce(sum(state = 'parked'), 0), coalesce(sum(state = 'skipped'), 0)
         FROM factline_parked_events WHERE projection = ?1 AND version = ?2",
        params![name, version],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
}

fn parked_events(
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

fn skip_parked(
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

/// A [`SqliteProjection`] updated by the SQLite store's writer in each
/// append's own transaction (C6): open the store with
/// `SqliteStore::open_with_inline(config, vec![Box::new(SqliteInline::new(p)?)])`.
/// Its read model lives in the events' file, is never behind the log, and
/// shows in the admin view like any projection. A refused event fails the
/// append that brought it; nothing of that append is written.
pub struct SqliteInline<P> {
    name: String,
    tables: Tables,
    projection: P,
    set_up: bool,
    /// The checkpoint as last read or written in the writer's transaction.
    seen: Option<u64>,
}

impl<P: SqliteProjection> SqliteInline<P> {
    /// An inline projection, run by the SQLite store's writer in the append's transaction.
    pub fn new(projection: P) -> Result<Self, ProjectionError> {
        let name = projection.name().to_owned();
        crate::validate_name(&name)?;
        let tables = Tables::new(&name, None, projection.version(), projection.tables())?;
        Ok(SqliteInline {
            name,
            tables,
            projection,
            set_up: false,
            seen: None,
        })
    }
}

impl<P: SqliteProjection> factline_sqlite::InlineProjection for SqliteInline<P> {
    fn name(&self) -> &str {
        &self.name
    }

    fn checkpoint(&mut self, tx: &Transaction<'_>) -> Result<u64, InlineError> {
        let failed =
            |e| InlineError::Failed(factline_sqlite::sql::storage_error("the checkpoint", e));
        if !self.set_up {
            tx.execute_batch(CHECKPOINTS).map_err(failed)?;
        }
        let key = checkpoint_key(&self.name, self.tables.version(), None);
        let at = stored_checkpoint(tx, &key).map_err(failed)?;
        self.seen = Some(at);
        Ok(at)
    }

    fn apply(&mut self, tx: &Transaction<'_>, events: &[RecordedEvent]) -> Result<(), InlineError> {
        let batch = Batch {
            name: &self.name,
            mode: Mode::Live,
            tables: &self.tables,
            partition: None,
            seen: self.seen,
            set_up: self.set_up,
            held: &HashSet::new(),
            inline: true,
        };
        let failed = |message: String| InlineError::Failed(StorageError::new(message));
        match batch.write(tx, &mut self.projection, events, &Handling::Apply) {
            Ok(BatchEnd::Committed(_)) => {
                self.set_up = true;
                self.seen = events.last().map(|e| e.position).or(self.seen);
                Ok(())
            }
            Ok(BatchEnd::Refused(position, refusal)) => {
                Err(InlineError::refused(position, refusal.into_message()))
            }
            Ok(BatchEnd::Forbidden(e)) => Err(failed(e.to_string())),
            Ok(BatchEnd::Contended(found)) => Err(failed(format!(
                "its checkpoint moved to {found} outside the writer"
            ))),
            Ok(BatchEnd::Paused) => Err(failed(format!("{} is paused", self.name))),
            Err(e) => Err(InlineError::Failed(factline_sqlite::sql::storage_error(
                "the inline read model",
                e,
            ))),
        }
    }

    fn rolled_back(&mut self) {
        self.set_up = false;
        self.seen = None;
    }
}

/// Operators' view of the projections in a SQLite read-model file, and
/// pausing and resuming them from any process.
pub struct SqliteAdmin(SqliteCheckpoints);

impl SqliteAdmin {
    /// Opens the read-model file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ProjectionError> {
        SqliteCheckpoints::open(path).map(SqliteAdmin)
    }

    /// Every projection with a checkpoint or a registered version.
    pub async fn projections(&self) -> Result<Vec<crate::ProjectionInfo>, ProjectionError> {
        self.0
            .with_conn("admin", |conn| {
                let mut rows = crate::admin::Rows::default();
                let mut stmt =
                    conn.prepare("SELECT name, active_version FROM factline_projection_versions")?;
                rows.registry = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                let mut stmt = conn.prepare(
                    "SELECT name, position, updated_at FROM factline_projection_checkpoints",
                )?;
                rows.checkpoints = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get(0)?,
                            r.get::<_, i64>(1)? as u64,
                            chrono::DateTime::from_timestamp_micros(r.get(2)?),
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                let mut stmt =
                    conn.prepare("SELECT name, paused FROM factline_projection_controls")?;
                rows.controls = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                let mut stmt = conn.prepare(
                    "SELECT projection, version, sum(state = 'parked'), sum(state = 'skipped')
                     FROM factline_parked_events GROUP BY projection, version",
                )?;
                rows.parked = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get::<_, i64>(2)? as u64,
                            r.get::<_, i64>(3)? as u64,
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(rows.gather())
            })
            .await
    }

    /// The parked events of `name`'s active version.
    pub async fn parked(&self, name: &str) -> Result<Vec<ParkedEvent>, ProjectionError> {
        let key = name.to_owned();
        self.0
            .with_conn(name, move |conn| match active_version(conn, &key)? {
                Some(active) => parked_events(conn, &key, active.version),
                None => Ok(Vec::new()),
            })
            .await
    }

    /// Skips the parked event at `position` of `name`'s active version;
    /// false when no such event is parked. A runner of the projection
    /// releases its stream when it next starts or retries.
    pub async fn skip(&self, name: &str, position: u64) -> Result<bool, ProjectionError> {
        let key = name.to_owned();
        self.0
            .with_conn(name, move |conn| match active_version(conn, &key)? {
                Some(active) => skip_parked(conn, &key, active.version, position),
                None => Ok(false),
            })
            .await
    }

    /// Pauses or resumes `name` in every process that runs it. One write
    /// statement: it waits for a batch in progress, and every later batch
    /// sees it, so no batch commits after a pause returns.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<(), ProjectionError> {
        crate::validate_name(name)?;
        let key = name.to_owned();
        self.0
            .with_conn(name, move |conn| {
                conn.execute(
                    "INSERT INTO factline_projection_controls (name, paused, updated_at)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET paused = excluded.paused,
                                                      updated_at = excluded.updated_at",
                    params![key, paused, chrono::Utc::now().timestamp_micros()],
                )
                .map(|_| ())
            })
            .await
    }
}
