//! Operators' view of the read models in PostgreSQL: list, pause, resume,
//! parked events.

use super::*;

/// Operators' view of the projections in a PostgreSQL read-model schema,
/// and pausing and resuming them from any process.
pub struct PostgresAdmin {
    pub(super) client: Client,
    pub(super) schema: String,
}

impl PostgresAdmin {
    /// Connects to the read-model schema `schema` of the database at `url`.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, ProjectionError> {
        let (client, _) = connect_with_checkpoints(url, schema, "admin").await?;
        Ok(PostgresAdmin {
            client,
            schema: schema.to_owned(),
        })
    }

    /// Every projection with a checkpoint or a registered version.
    pub async fn projections(&self) -> Result<Vec<crate::ProjectionInfo>, ProjectionError> {
        let s = &self.schema;
        let fail = |e| failure("admin", "listing the projections", e);
        let query = |sql: String| async move { self.client.query(&sql, &[]).await };
        let (registry, checkpoints, controls, parked) = tokio::try_join!(
            query(format!(
                "SELECT name, active_version FROM \"{s}\".projection_versions"
            )),
            query(format!(
                "SELECT name, position, updated_at FROM \"{s}\".projection_checkpoints"
            )),
            query(format!(
                "SELECT name, paused FROM \"{s}\".projection_controls"
            )),
            query(format!(
                "SELECT projection, version, count(*) FILTER (WHERE state = 'parked'),
                        count(*) FILTER (WHERE state = 'skipped')
                 FROM \"{s}\".projection_parked_events GROUP BY projection, version"
            )),
        )
        .map_err(fail)?;
        let rows = crate::admin::Rows {
            registry: registry
                .iter()
                .map(|r| (r.get(0), r.get::<_, i32>(1) as u32))
                .collect(),
            checkpoints: checkpoints
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as u64, Some(r.get(2))))
                .collect(),
            controls: controls.iter().map(|r| (r.get(0), r.get(1))).collect(),
            parked: parked
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        r.get::<_, i32>(1) as u32,
                        r.get::<_, i64>(2) as u64,
                        r.get::<_, i64>(3) as u64,
                    )
                })
                .collect(),
        };
        Ok(rows.gather())
    }

    pub(super) async fn active_version(&self, name: &str) -> Result<Option<u32>, ProjectionError> {
        let s = &self.schema;
        let row = self
            .client
            .query_opt(
                &format!("SELECT active_version FROM \"{s}\".projection_versions WHERE name = $1"),
                &[&name],
            )
            .await
            .map_err(|e| failure(name, "reading the active version", e))?;
        Ok(row.map(|r| r.get::<_, i32>(0) as u32))
    }

    /// The parked events of `name`'s active version.
    pub async fn parked(&self, name: &str) -> Result<Vec<ParkedEvent>, ProjectionError> {
        let Some(version) = self.active_version(name).await? else {
            return Ok(Vec::new());
        };
        let table = format!("\"{}\".projection_parked_events", self.schema);
        parked_events(&self.client, &table, name, version)
            .await
            .map_err(|e| failure(name, "listing parked events", e))
    }

    /// Skips the parked event at `position` of `name`'s active version;
    /// false when no such event is parked. A runner of the projection
    /// releases its stream when it next starts or retries.
    pub async fn skip(&self, name: &str, position: u64) -> Result<bool, ProjectionError> {
        let Some(version) = self.active_version(name).await? else {
            return Ok(false);
        };
        let table = format!("\"{}\".projection_parked_events", self.schema);
        skip_parked(&self.client, &table, name, version, position)
            .await
            .map_err(|e| failure(name, "skipping a parked event", e))
    }

    /// Pauses or resumes `name` in every process that runs it. It takes the
    /// registry row exclusively first, so it waits for a batch in progress,
    /// and every later batch sees it: no batch commits after a pause
    /// returns.
    pub async fn set_paused(&mut self, name: &str, paused: bool) -> Result<(), ProjectionError> {
        crate::validate_name(name)?;
        let s = self.schema.clone();
        let fail = |e| failure(name, "pausing or resuming", e);
        let tx = self.client.transaction().await.map_err(fail)?;
        tx.execute(
            &format!("SELECT 1 FROM \"{s}\".projection_versions WHERE name = $1 FOR UPDATE"),
            &[&name],
        )
        .await
        .map_err(fail)?;
        tx.execute(
            &format!(
                "INSERT INTO \"{s}\".projection_controls (name, paused, updated_at)
                 VALUES ($1, $2, now())
                 ON CONFLICT (name) DO UPDATE SET paused = excluded.paused,
                                                  updated_at = excluded.updated_at"
            ),
            &[&name, &paused],
        )
        .await
        .map_err(fail)?;
        tx.commit().await.map_err(fail)
    }
}

/// The position the active version of `name` in `schema` has reached (the
/// smallest checkpoint of its partitions), read through `client` — in the
/// same read transaction as a query of its rows, for an answer that says
/// which events it reflects. `None` before its first batch.
pub async fn active_position(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
    name: &str,
) -> Result<Option<u64>, tokio_postgres::Error> {
    // The checkpoint keys of a version: `name@vN`, or `name@vN#i/n` per
    // partition (see `checkpoint_key`).
    let sql = format!(
        "SELECT min(c.position) FROM \"{schema}\".projection_versions v
         JOIN \"{schema}\".projection_checkpoints c
           ON c.name = v.name || '@v' || v.active_version
           OR starts_with(c.name, v.name || '@v' || v.active_version || '#')
         WHERE v.name = $1"
    );
    let row = client.query_one(&sql, &[&name]).await?;
    Ok(row.get::<_, Option<i64>>(0).map(|p| p as u64))
}
