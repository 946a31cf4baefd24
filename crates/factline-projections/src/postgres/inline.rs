//! Projections the store's writer runs in the append's own transaction (C6) on
//! PostgreSQL.

use super::*;

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
    pub(super) name: String,
    pub(super) schema: String,
    pub(super) tables: Tables,
    pub(super) projection: P,
    pub(super) set_up: bool,
    /// The checkpoint as last read or written in the writer's transaction.
    pub(super) seen: Option<u64>,
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
    pub(super) async fn set_up(&mut self, client: &Client) -> Result<(), InlineError> {
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
    pub(super) async fn run(
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
            factline_postgres::migrate::apply_in(
                client,
                &self.schema,
                READ_MODELS,
                READ_MODEL_MIGRATIONS,
            )
            .await?;
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
