//! Operators' view of the read models in SQLite: list, pause, resume, parked
//! events.

use super::*;

/// Operators' view of the projections in a SQLite read-model file, and
/// pausing and resuming them from any process.
pub struct SqliteAdmin(SqliteCheckpoints);

impl SqliteAdmin {
    /// Opens the read-model file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ProjectionError> {
        SqliteCheckpoints::open(path).map(SqliteAdmin)
    }

    /// Every projection with a checkpoint or a registered version.
    pub async fn projections(&self) -> Result<Vec<crate::ProjectionInfo>, ProjectionError> {
        self.0
            .with_conn("admin", |conn| {
                let mut rows = crate::admin::Rows::default();
                let mut stmt =
                    conn.prepare("SELECT name, active_version FROM factline_projection_versions")?;
                rows.registry = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                let mut stmt = conn.prepare(
                    "SELECT name, position, updated_at FROM factline_projection_checkpoints",
                )?;
                rows.checkpoints = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get(0)?,
                            r.get::<_, i64>(1)? as u64,
                            chrono::DateTime::from_timestamp_micros(r.get(2)?),
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                let mut stmt =
                    conn.prepare("SELECT name, paused FROM factline_projection_controls")?;
                rows.controls = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                let mut stmt = conn.prepare(
                    "SELECT projection, version, sum(state = 'parked'), sum(state = 'skipped')
                     FROM factline_parked_events GROUP BY projection, version",
                )?;
                rows.parked = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get::<_, i64>(2)? as u64,
                            r.get::<_, i64>(3)? as u64,
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(rows.gather())
            })
            .await
    }

    /// The parked events of `name`'s active version.
    pub async fn parked(&self, name: &str) -> Result<Vec<ParkedEvent>, ProjectionError> {
        let key = name.to_owned();
        self.0
            .with_conn(name, move |conn| match active_version(conn, &key)? {
                Some(active) => parked_events(conn, &key, active.version),
                None => Ok(Vec::new()),
            })
            .await
    }

    /// Skips the parked event at `position` of `name`'s active version;
    /// false when no such event is parked. A runner of the projection
    /// releases its stream when it next starts or retries.
    pub async fn skip(&self, name: &str, position: u64) -> Result<bool, ProjectionError> {
        let key = name.to_owned();
        self.0
            .with_conn(name, move |conn| match active_version(conn, &key)? {
                Some(active) => skip_parked(conn, &key, active.version, position),
                None => Ok(false),
            })
            .await
    }

    /// Pauses or resumes `name` in every process that runs it. One write
    /// statement: it waits for a batch in progress, and every later batch
    /// sees it, so no batch commits after a pause returns.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<(), ProjectionError> {
        crate::validate_name(name)?;
        let key = name.to_owned();
        self.0
            .with_conn(name, move |conn| {
                conn.execute(
                    "INSERT INTO factline_projection_controls (name, paused, updated_at)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET paused = excluded.paused,
                                                      updated_at = excluded.updated_at",
                    params![key, paused, chrono::Utc::now().timestamp_micros()],
                )
                .map(|_| ())
            })
            .await
    }
}

/// The position the active version of `name` has reached (the smallest
/// checkpoint of its partitions), read on `conn` — in the same read
/// transaction as a query of its rows, for an answer that says which
/// events it reflects. `None` before its first batch.
pub fn active_position(conn: &Connection, name: &str) -> rusqlite::Result<Option<u64>> {
    // The checkpoint keys of a version: `name@vN`, or `name@vN#i/n` per
    // partition (see `checkpoint_key`).
    let sql = "SELECT min(c.position) FROM factline_projection_versions v
               JOIN factline_projection_checkpoints c
                 ON c.name = v.name || '@v' || v.active_version
                 OR substr(c.name, 1, length(v.name) + length(v.active_version) + 3)
                    = v.name || '@v' || v.active_version || '#'
               WHERE v.name = ?1";
    conn.prepare_cached(sql)?
        .query_row(params![name], |r| r.get::<_, Option<i64>>(0))
        .map(|p| p.map(|p| p as u64))
}
