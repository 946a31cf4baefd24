//! The sink a `Runner` commits batches through on SQLite: rows and checkpoint
//! in one transaction.

use super::*;

/// Commits a [`SqliteProjection`]'s batches to its read-model file, one
/// transaction per batch with the checkpoint.
pub struct SqliteSink<P> {
    pub(super) name: String,
    pub(super) path: PathBuf,
    pub(super) tables: Tables,
    pub(super) mode: Mode,
    /// Taken while a batch runs on a blocking thread.
    pub(super) parts: Option<(Connection, P)>,
    pub(super) set_up: bool,
    /// Streams with parked events: their later events are held back.
    pub(super) held: Option<Arc<HashSet<String>>>,
    pub(super) partition: Option<Partition>,
    /// The checkpoint as this sink last read or wrote it.
    pub(super) seen: Option<u64>,
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

    pub(super) fn open_in(path: &Path, projection: P, mode: Mode) -> Result<Self, ProjectionError> {
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
        let mut conn = Connection::open(&path).map_err(&failed)?;
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
        factline_sqlite::migrate::apply(&mut conn, READ_MODELS, MIGRATIONS)
            .map_err(|e| ProjectionError::read_model(name.clone(), e))?;
        if let Some(fingerprint) = projection.fingerprint() {
            check_definition(&conn, &name, tables.version(), &fingerprint)?;
        }
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
    pub(super) async fn with_parts<T: Send + 'static>(
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
pub(super) fn read_model_failure(
    projection: String,
) -> impl Fn(rusqlite::Error) -> ProjectionError {
    move |e| {
        ProjectionError::read_model(
            projection.clone(),
            factline_sqlite::sql::storage_error("the read model", e),
        )
    }
}

/// How a batch on the blocking thread ended.
pub(super) enum BatchEnd {
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
        let sole_writer = self.partition.is_none();
        if let Some((_, projection)) = self.parts.as_mut() {
            projection.resuming(position, sole_writer);
        }
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
pub(super) struct Batch<'a> {
    pub(super) name: &'a str,
    pub(super) mode: Mode,
    pub(super) tables: &'a Tables,
    pub(super) partition: Option<Partition>,
    /// The checkpoint as the sink last saw it.
    pub(super) seen: Option<u64>,
    pub(super) set_up: bool,
    /// Streams held back behind a parked event.
    pub(super) held: &'a HashSet<String>,
    /// Run by the store's writer in the append's transaction: no pause, no
    /// parking.
    pub(super) inline: bool,
}

impl Batch<'_> {
    /// Everything of a batch but the commit, inside `tx`: the registry
    /// check, setup, the events (applied, held back, or parked), and the
    /// checkpoint. `Committed` means ready to commit.
    pub(super) fn write<P: SqliteProjection>(
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
    pub(super) async fn write_batch(
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
