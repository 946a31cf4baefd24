//! Blue/green versions (P4) on SQLite: swapping a rebuilt version in,
//! discarding one.

use super::*;

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
                        forget_definition(&tx, &name, old.version).map_err(&sql)?;
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
            forget_definition(&tx, &name, tables.version()).map_err(&sql)?;
            tx.commit().map_err(&sql)
        })
        .await
    }
}
