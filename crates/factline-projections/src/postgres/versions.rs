//! Blue/green versions (P4) on PostgreSQL: swapping a rebuilt version in,
//! discarding one.

use super::*;

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
                tx.execute(
                    &forget_definition_sql(&self.schema),
                    &[&name, &(old.version as i32)],
                )
                .await
                .map_err(|e| fail("forgetting the old definition", e))?;
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
        tx.execute(
            &forget_definition_sql(&self.schema),
            &[&name, &(self.tables.version() as i32)],
        )
        .await
        .map_err(|e| fail("forgetting the definition", e))?;
        tx.commit()
            .await
            .map_err(|e| fail("committing the discard", e))
    }
}
