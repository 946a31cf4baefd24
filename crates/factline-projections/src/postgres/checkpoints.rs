//! Reactor checkpoints and idempotent upserts (P2) in PostgreSQL.

use super::*;

/// Upserts a row of a read model kept outside the projection's
/// transaction (P2): the row carries `last_position`, and the write wins
/// only when `position` is newer than the row's, so replays and reordered
/// deliveries never overwrite newer state. Returns whether it won.
///
/// `key` and `values` are (column, value) pairs; the table needs a unique
/// key over the `key` columns and a `last_position bigint` column. `table`
/// may be schema-qualified (`read.orders`).
pub async fn upsert_if_newer<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    table: &str,
    key: &[(&str, &(dyn tokio_postgres::types::ToSql + Sync))],
    values: &[(&str, &(dyn tokio_postgres::types::ToSql + Sync))],
    position: u64,
) -> Result<bool, ApplyError> {
    let sql = crate::upsert_sql(table, key, values, |n| format!("${n}"))?;
    let position = position as i64;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        key.iter().chain(values).map(|(_, v)| *v).collect();
    params.push(&position);
    Ok(client.execute(&sql, &params).await? > 0)
}

/// Reactor checkpoints in PostgreSQL (`<schema>.projection_checkpoints`,
/// the table projections use).
pub struct PostgresCheckpoints {
    pub(super) client: Client,
    pub(super) table: String,
}

impl PostgresCheckpoints {
    /// Connects to the database at `url` and keeps the checkpoints in `schema`.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, ProjectionError> {
        let (client, table) = connect_with_checkpoints(url, schema, "reactor checkpoints").await?;
        Ok(PostgresCheckpoints { client, table })
    }
}

#[async_trait]
impl crate::Checkpoints for PostgresCheckpoints {
    async fn load(&self, name: &str) -> Result<Option<u64>, ProjectionError> {
        let row = self
            .client
            .query_opt(
                &format!("SELECT position FROM {} WHERE name = $1", self.table),
                &[&name],
            )
            .await
            .map_err(|e| failure(name, "reading the checkpoint", e))?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    async fn save(&self, name: &str, position: u64) -> Result<(), ProjectionError> {
        self.client
            .execute(
                &save_checkpoint_sql(&self.table),
                &[&name, &(position as i64)],
            )
            .await
            .map(|_| ())
            .map_err(|e| failure(name, "saving the checkpoint", e))
    }
}
