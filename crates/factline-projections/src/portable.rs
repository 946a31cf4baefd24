//! Projections written once for both databases: a [`SqlProjection`] turns
//! each event into SQL statements (with `$1`, `$2`… parameters and types
//! both databases know: `TEXT`, `BIGINT`), and [`Portable`] runs it as a
//! [`SqliteProjection`] or a [`PostgresProjection`].

use std::collections::HashMap;
use std::error::Error;

use async_trait::async_trait;
use bytes::BytesMut;
use factline_core::RecordedEvent;
use futures_util::future::try_join_all;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

use crate::{ApplyError, PostgresProjection, SqliteProjection, Tables};

/// A statement parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SqlValue {
    Int(i64),
    Text(String),
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// SQL with `$1`, `$2`… for the parameters.
    pub sql: String,
    pub params: Vec<SqlValue>,
}

impl Statement {
    pub fn new(sql: impl Into<String>, params: Vec<SqlValue>) -> Self {
        Statement {
            sql: sql.into(),
            params,
        }
    }
}

/// Which database a batch's statements are for (see
/// [`SqlProjection::batch_statements`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A projection expressed as SQL both SQLite and PostgreSQL run.
pub trait SqlProjection: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn version(&self) -> u32 {
        1
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
    fn tables(&self) -> &[&str] {
        (**self).tables()
    }
    fn create_tables(&self, tables: &Tables) -> Vec<String> {
        (**self).create_tables(tables)
    }
    fn create_tables_for(&self, dialect: Dialect, tables: &Tables) -> Vec<String> {
        (**self).create_tables_for(dialect, tables)
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
    projection: P,
    /// PostgreSQL statements prepared on the sink's connection, by SQL.
    prepared: HashMap<String, tokio_postgres::Statement>,
    /// The version to build instead of the code's own (see
    /// [`Portable::at_version`]).
    version: Option<u32>,
    /// SQLite spellings of the statements seen, by their `$n` spelling.
    sqlite_sql: HashMap<String, String>,
}

impl<P: SqlProjection> Portable<P> {
    fn run_sqlite(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        statements: &[Statement],
    ) -> Result<(), ApplyError> {
        for statement in statements {
            // The same few statements come back for every event: convert
            // each once.
            let sql = match self.sqlite_sql.get(&statement.sql) {
                Some(sql) => sql,
                None => self
                    .sqlite_sql
                    .entry(statement.sql.clone())
                    .or_insert_with(|| sqlite_sql(&statement.sql)),
            };
            tx.prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(&statement.params))?;
        }
        Ok(())
    }

    pub fn new(projection: P) -> Self {
        Portable {
            projection,
            prepared: HashMap::new(),
            version: None,
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

    pub fn projection(&self) -> &P {
        &self.projection
    }
}

/// `$n` parameters as SQLite's numbered `?n` (the same numbers, so a
/// parameter may appear twice or out of order).
fn sqlite_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

impl rusqlite::ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match self {
            SqlValue::Int(v) => ToSqlOutput::Owned(Value::Integer(*v)),
            SqlValue::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            SqlValue::Null => ToSqlOutput::Owned(Value::Null),
        })
    }
}

impl ToSql for SqlValue {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            SqlValue::Null => Ok(IsNull::Yes),
            SqlValue::Text(v) => v.to_sql(ty, out),
            SqlValue::Int(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            SqlValue::Int(v) if *ty == Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
            SqlValue::Int(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked value by value in `to_sql`.
        true
    }

    to_sql_checked!();
}

impl<P: SqlProjection> SqliteProjection for Portable<P> {
    fn name(&self) -> &str {
        self.projection.name()
    }
    fn version(&self) -> u32 {
        self.version.unwrap_or_else(|| self.projection.version())
    }
    fn tables(&self) -> &[&str] {
        self.projection.tables()
    }
    fn setup(&mut self, tx: &rusqlite::Transaction<'_>, tables: &Tables) -> rusqlite::Result<()> {
        for ddl in self.projection.create_tables_for(Dialect::Sqlite, tables) {
            tx.execute(&sqlite_sql(&ddl), [])?;
        }
        Ok(())
    }
    fn apply(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ApplyError> {
        let statements = self.projection.statements(tables, event)?;
        self.run_sqlite(tx, &statements)
    }

    fn apply_all(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), (u64, ApplyError)> {
        let first = events.first().map_or(0, |e| e.position);
        match self
            .projection
            .batch_statements(Dialect::Sqlite, tables, events)
        {
            Some(statements) => statements
                .and_then(|statements| self.run_sqlite(tx, &statements))
                .map_err(|e| (first, e)),
            None => {
                for event in events {
                    SqliteProjection::apply(self, tx, tables, event)
                        .map_err(|e| (event.position, e))?;
                }
                Ok(())
            }
        }
    }
}

#[async_trait]
impl<P: SqlProjection> PostgresProjection for Portable<P> {
    fn name(&self) -> &str {
        self.projection.name()
    }
    fn version(&self) -> u32 {
        self.version.unwrap_or_else(|| self.projection.version())
    }
    fn tables(&self) -> &[&str] {
        self.projection.tables()
    }
    async fn setup(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &Tables,
    ) -> Result<(), tokio_postgres::Error> {
        for ddl in self.projection.create_tables_for(Dialect::Postgres, tables) {
            tx.batch_execute(&ddl).await?;
        }
        Ok(())
    }
    async fn apply(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ApplyError> {
        PostgresProjection::apply_all(self, tx, tables, std::slice::from_ref(event))
            .await
            .map_err(|(_, e)| e)
    }

    /// Every statement of the run goes out at once, prepared once per
    /// connection: one round trip for the whole batch instead of one per
    /// statement.
    async fn apply_all(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), (u64, ApplyError)> {
        let first = events.first().map_or(0, |e| e.position);
        let mut statements = Vec::new();
        match self
            .projection
            .batch_statements(Dialect::Postgres, tables, events)
        {
            Some(made) => {
                let made = made.map_err(|e| (first, e))?;
                statements.extend(made.into_iter().map(|s| (first, s)));
            }
            None => {
                for event in events {
                    let made = self
                        .projection
                        .statements(tables, event)
                        .map_err(|e| (event.position, e))?;
                    statements.extend(made.into_iter().map(|s| (event.position, s)));
                }
            }
        }
        let mut missing: Vec<&str> = statements
            .iter()
            .map(|(_, s)| s.sql.as_str())
            .filter(|sql| !self.prepared.contains_key(*sql))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let prepared = try_join_all(missing.iter().map(|sql| tx.prepare(sql)))
            .await
            .map_err(|e| (first, ApplyError::from(e)))?;
        for (sql, statement) in missing.into_iter().zip(prepared) {
            self.prepared.insert(sql.to_owned(), statement);
        }
        let runs = statements.iter().map(|(position, statement)| {
            let prepared = &self.prepared[&statement.sql];
            let params: Vec<&(dyn ToSql + Sync)> = statement
                .params
                .iter()
                .map(|p| p as &(dyn ToSql + Sync))
                .collect();
            async move {
                tx.execute(prepared, &params)
                    .await
                    .map_err(|e| (*position, ApplyError::from(e)))
            }
        });
        // Answers come back in order, so the first error is the statement
        // that failed; the ones after it only report the aborted
        // transaction.
        try_join_all(runs).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_parameters_become_numbered_sqlite_ones() {
        assert_eq!(
            sqlite_sql("UPDATE t SET a = $2 WHERE k = $1 AND b = $2 AND c = '$'"),
            "UPDATE t SET a = ?2 WHERE k = ?1 AND b = ?2 AND c = '$'"
        );
    }
}
