//! Projections the store's writer runs in the append's own transaction (C6) on
//! SQLite.

use super::*;

/// A [`SqliteProjection`] updated by the SQLite store's writer in each
/// append's own transaction (C6): open the store with
/// `SqliteStore::open_with_inline(config, vec![Box::new(SqliteInline::new(p)?)])`.
/// Its read model lives in the events' file, is never behind the log, and
/// shows in the admin view like any projection. A refused event fails the
/// append that brought it; nothing of that append is written.
pub struct SqliteInline<P> {
    pub(super) name: String,
    pub(super) tables: Tables,
    pub(super) projection: P,
    pub(super) set_up: bool,
    /// The checkpoint as last read or written in the writer's transaction.
    pub(super) seen: Option<u64>,
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
            factline_sqlite::migrate::apply_in(tx, READ_MODELS, MIGRATIONS)?;
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
