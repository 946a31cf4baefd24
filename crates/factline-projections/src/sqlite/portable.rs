//! [`Portable`] on SQLite: `$n` parameters become `?n`, statements are
//! cached per connection.

use factline_core::RecordedEvent;

use super::SqliteProjection;
use crate::{ApplyError, Dialect, Portable, SqlProjection, SqlValue, Statement, Tables};

impl<P: SqlProjection> Portable<P> {
    pub(super) fn run_sqlite(
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
            let mut prepared = tx.prepare_cached(sql)?;
            let params = rusqlite::params_from_iter(&statement.params);
            let Some((expected, message)) = &statement.expected else {
                prepared.execute(params)?;
                continue;
            };
            let rows = if prepared.readonly() {
                // Counted only as far as the expectation needs.
                let wanted = match expected {
                    crate::Expected::AtLeast(n) => *n,
                    _ => 1,
                };
                let mut rows = prepared.query(params)?;
                let mut found = 0;
                while found < wanted && rows.next()?.is_some() {
                    found += 1;
                }
                found
            } else {
                prepared.execute(params)? as u64
            };
            if !expected.met_by(rows) {
                return Err(ApplyError::new(message.clone()));
            }
        }
        Ok(())
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
            SqlValue::Real(v) => ToSqlOutput::Owned(Value::Real(*v)),
            SqlValue::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            SqlValue::Null => ToSqlOutput::Owned(Value::Null),
        })
    }
}

impl<P: SqlProjection> SqliteProjection for Portable<P> {
    fn name(&self) -> &str {
        self.projection.name()
    }
    fn version(&self) -> u32 {
        self.version.unwrap_or_else(|| self.projection.version())
    }
    fn fingerprint(&self) -> Option<String> {
        self.projection.fingerprint()
    }
    fn tables(&self) -> &[&str] {
        self.projection.tables()
    }
    fn resuming(&mut self, checkpoint: u64, sole_writer: bool) {
        self.projection.resuming(checkpoint, sole_writer)
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
