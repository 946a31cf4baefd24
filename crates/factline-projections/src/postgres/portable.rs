//! [`Portable`] on PostgreSQL: every statement of a batch is prepared once
//! per connection and sent in one round trip.

use std::error::Error;

use async_trait::async_trait;
use bytes::BytesMut;
use factline_core::RecordedEvent;
use futures_util::future::try_join_all;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

use super::PostgresProjection;
use crate::{ApplyError, Dialect, Portable, SqlProjection, SqlValue, Tables};

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
            SqlValue::Real(v) if *ty == Type::FLOAT4 => (*v as f32).to_sql(ty, out),
            SqlValue::Real(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked value by value in `to_sql`.
        true
    }

    to_sql_checked!();
}

#[async_trait]
impl<P: SqlProjection> PostgresProjection for Portable<P> {
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
                let changed = tx
                    .execute(prepared, &params)
                    .await
                    .map_err(|e| (*position, ApplyError::from(e)))?;
                match &statement.expected {
                    Some((expected, message)) if !expected.met_by(changed) => {
                        Err((*position, ApplyError::new(message.clone())))
                    }
                    _ => Ok(()),
                }
            }
        });
        // Answers come back in order, so the first error is the statement
        // that failed; the ones after it only report the aborted
        // transaction.
        try_join_all(runs).await.map(|_| ())
    }
}
