//! Projections written once for both databases: a [`SqlProjection`] turns
//! each event into SQL statements (with `$1`, `$2`… parameters and types
//! both databases know: `TEXT`, `BIGINT`), and [`Portable`] runs it as a
//! `SqliteProjection` or a `PostgresProjection` (each backend's half is in
//! its own module, `sqlite/portable.rs` and `postgres/portable.rs`).

use std::collections::HashMap;

use factline_core::RecordedEvent;

use crate::{ApplyError, Tables};

/// A statement parameter.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum SqlValue {
    /// An integer (`BIGINT`, or `INTEGER`/`SMALLINT` where the column is one).
    Int(i64),
    /// A floating-point number (`DOUBLE PRECISION`, or `REAL` where the
    /// column is one).
    Real(f64),
    /// A text value.
    Text(String),
    /// SQL `NULL`.
    Null,
}

impl From<i64> for SqlValue {
    fn from(v: i64) -> Self {
        SqlValue::Int(v)
    }
}

impl From<u64> for SqlValue {
    fn from(v: u64) -> Self {
        SqlValue::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<&str> for SqlValue {
    fn from(v: &str) -> Self {
        SqlValue::Text(v.to_owned())
    }
}

impl From<String> for SqlValue {
    fn from(v: String) -> Self {
        SqlValue::Text(v)
    }
}

/// One statement an event makes.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Statement {
    /// SQL with `$1`, `$2`… for the parameters.
    pub sql: String,
    /// The values of `$1`, `$2`, … in order.
    pub params: Vec<SqlValue>,
    /// When set, how many rows the statement must change (or, for a
    /// `SELECT`, find); if it does not, the event cannot be applied, for
    /// the reason given (see [`Statement::requiring_a_row`]).
    pub expected: Option<(Expected, String)>,
}

/// How many rows a statement must change or find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Expected {
    /// At least this many.
    AtLeast(u64),
    /// None at all (a `SELECT` of what must not exist).
    None,
}

impl Expected {
    /// Whether `rows` rows meet it.
    pub fn met_by(self, rows: u64) -> bool {
        match self {
            Expected::AtLeast(n) => rows >= n,
            Expected::None => rows == 0,
        }
    }
}

impl Statement {
    /// A statement with its parameters.
    pub fn new(sql: impl Into<String>, params: Vec<SqlValue>) -> Self {
        Statement {
            sql: sql.into(),
            params,
            expected: None,
        }
    }

    /// The same statement, which must change (or, for a `SELECT`, find) at
    /// least one row: otherwise the event is refused with `message`, as an
    /// [`ApplyError`] from the projection (parked or stopping the runner by
    /// its poison policy).
    pub fn requiring_a_row(self, message: impl Into<String>) -> Self {
        self.requiring(Expected::AtLeast(1), message)
    }

    /// The same statement, which must change or find as many rows as
    /// `expected` says, or the batch is refused with `message`.
    pub fn requiring(mut self, expected: Expected, message: impl Into<String>) -> Self {
        self.expected = Some((expected, message.into()));
        self
    }
}

/// Which database a batch's statements are for (see
/// [`SqlProjection::batch_statements`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A projection expressed as SQL both SQLite and PostgreSQL run.
pub trait SqlProjection: Send + Sync + 'static {
    /// The projection's name: 1 to 100 letters, digits, `_`, `-` or `.`.
    fn name(&self) -> &str;
    /// The version of its code; raise it to rebuild the read model beside the active one.
    fn version(&self) -> u32 {
        1
    }
    /// A digest of what decides the read model's content, for projections
    /// whose definition is data (declared read models): a version built
    /// from one definition is never continued by another.
    fn fingerprint(&self) -> Option<String> {
        None
    }
    /// The logical table names; see [`Tables`].
    fn tables(&self) -> &[&str];
    /// `CREATE TABLE IF NOT EXISTS …` (and indexes) for this version.
    fn create_tables(&self, tables: &Tables) -> Vec<String>;

    /// [`SqlProjection::create_tables`] for one database, for what only it
    /// has (SQLite's `WITHOUT ROWID` tables keyed by text, say).
    fn create_tables_for(&self, dialect: Dialect, tables: &Tables) -> Vec<String> {
        let _ = dialect;
        self.create_tables(tables)
    }
    /// Told when a run starts, before its first batch: it reads on from
    /// `checkpoint`, and `sole_writer` is false when the run is one
    /// partition of several. A projection that remembers rows it wrote
    /// between batches learns here what it may rely on: from checkpoint 0
    /// as the sole writer, this version's tables hold nothing it has not
    /// been given since.
    fn resuming(&mut self, checkpoint: u64, sole_writer: bool) {
        let _ = (checkpoint, sole_writer);
    }

    /// The statements `event` makes, run in order in the batch's
    /// transaction.
    fn statements(
        &mut self,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<Vec<Statement>, ApplyError>;

    /// The statements of a whole batch at once, for projections that can do
    /// better than event by event: a few set-based statements (each event's
    /// values passed as one JSON parameter, say) instead of one or two per
    /// event, which on PostgreSQL is most of a rebuild's time. `None` (the
    /// default) runs [`SqlProjection::statements`] event by event.
    ///
    /// The batch's events are in global order and all to be applied. A
    /// failure is reported at the batch's first event; the runner then
    /// narrows it down by applying fewer events at a time.
    fn batch_statements(
        &mut self,
        dialect: Dialect,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Option<Result<Vec<Statement>, ApplyError>> {
        let _ = (dialect, tables, events);
        None
    }
}

/// Projections chosen at run time (by name, from a catalogue) share one
/// sink type.
impl SqlProjection for Box<dyn SqlProjection> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn version(&self) -> u32 {
        (**self).version()
    }
    fn fingerprint(&self) -> Option<String> {
        (**self).fingerprint()
    }
    fn tables(&self) -> &[&str] {
        (**self).tables()
    }
    fn create_tables(&self, tables: &Tables) -> Vec<String> {
        (**self).create_tables(tables)
    }
    fn create_tables_for(&self, dialect: Dialect, tables: &Tables) -> Vec<String> {
        (**self).create_tables_for(dialect, tables)
    }
    fn resuming(&mut self, checkpoint: u64, sole_writer: bool) {
        (**self).resuming(checkpoint, sole_writer)
    }
    fn statements(
        &mut self,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<Vec<Statement>, ApplyError> {
        (**self).statements(tables, event)
    }
    fn batch_statements(
        &mut self,
        dialect: Dialect,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Option<Result<Vec<Statement>, ApplyError>> {
        (**self).batch_statements(dialect, tables, events)
    }
}

/// Runs a [`SqlProjection`] on either database.
pub struct Portable<P> {
    pub(crate) projection: P,
    /// PostgreSQL statements prepared on the sink's connection, by SQL.
    #[cfg(feature = "postgres")]
    pub(crate) prepared: HashMap<String, tokio_postgres::Statement>,
    /// The version to build instead of the code's own (see
    /// [`Portable::at_version`]).
    pub(crate) version: Option<u32>,
    /// SQLite spellings of the statements seen, by their `$n` spelling.
    #[cfg(feature = "sqlite")]
    pub(crate) sqlite_sql: HashMap<String, String>,
}

impl<P: SqlProjection> Portable<P> {
    /// Runs `projection` at its own version.
    pub fn new(projection: P) -> Self {
        Portable {
            projection,
            #[cfg(feature = "postgres")]
            prepared: HashMap::new(),
            version: None,
            #[cfg(feature = "sqlite")]
            sqlite_sql: HashMap::new(),
        }
    }

    /// Runs the same code as another version of the read model: a rebuild
    /// of unchanged code (to repair data, or to change how it is
    /// partitioned) builds `active + 1`, and live runners then follow the
    /// active version. A version below the code's own is raised to it, so
    /// newer code never writes an older version's tables.
    pub fn at_version(mut self, version: u32) -> Self {
        self.version = Some(version.max(self.projection.version()));
        self
    }

    /// The projection it runs.
    pub fn projection(&self) -> &P {
        &self.projection
    }
}
