//! Reactor checkpoints and idempotent upserts (P2) in SQLite.

use super::*;

/// Upserts a row of a read model kept outside the projection's
/// transaction (P2): the row carries `last_position`, and the write wins
/// only when `position` is newer than the row's, so replays and reordered
/// deliveries never overwrite newer state. Returns whether it won.
///
/// `key` and `values` are (column, value) pairs; the table needs a unique
/// key over the `key` columns and a `last_position INTEGER` column.
pub fn upsert_if_newer(
    conn: &Connection,
    table: &str,
    key: &[(&str, &dyn rusqlite::ToSql)],
    values: &[(&str, &dyn rusqlite::ToSql)],
    position: u64,
) -> rusqlite::Result<bool> {
    let sql = crate::upsert_sql(table, key, values, |n| format!("?{n}"))
        .map_err(|e| rusqlite::Error::InvalidParameterName(e.to_string()))?;
    let position = position as i64;
    let mut params: Vec<&dyn rusqlite::ToSql> = key.iter().chain(values).map(|(_, v)| *v).collect();
    params.push(&position);
    conn.prepare_cached(&sql)?
        .execute(params.as_slice())
        .map(|changed| changed > 0)
}

/// Reactor checkpoints in a SQLite file (the table projections use).
pub struct SqliteCheckpoints {
    pub(super) conn: std::sync::Arc<std::sync::Mutex<Connection>>,
}

impl SqliteCheckpoints {
    /// Opens (creating if needed) the checkpoints table in the SQLite file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ProjectionError> {
        let path = path.as_ref();
        let failed = |e: rusqlite::Error| {
            let context = format!("opening {}", path.display());
            ProjectionError::read_model(
                "reactor checkpoints",
                factline_sqlite::sql::storage_error(&context, e),
            )
        };
        factline_core::backend::create_private_file(path).map_err(|e| {
            let context = format!("creating {}", path.display());
            ProjectionError::read_model(
                "reactor checkpoints",
                StorageError::with_source(context, e),
            )
        })?;
        let mut conn = Connection::open(path).map_err(&failed)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(&failed)?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .map_err(&failed)?;
        factline_sqlite::migrate::apply(&mut conn, READ_MODELS, MIGRATIONS)
            .map_err(|e| ProjectionError::read_model("reactor checkpoints", e))?;
        Ok(SqliteCheckpoints {
            conn: std::sync::Arc::new(std::sync::Mutex::new(conn)),
        })
    }

    pub(super) async fn with_conn<T: Send + 'static>(
        &self,
        name: &str,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, ProjectionError> {
        let conn = self.conn.clone();
        let failed = |source: StorageError| ProjectionError::read_model(name, source);
        tokio::task::spawn_blocking(move || {
            let conn = conn
                .lock()
                .map_err(|_| StorageError::new("the checkpoint connection was poisoned"))?;
            work(&conn).map_err(|e| factline_sqlite::sql::storage_error("the checkpoints", e))
        })
        .await
        .map_err(|e| failed(StorageError::with_source("a checkpoint task failed", e)))?
        .map_err(failed)
    }
}

#[async_trait]
impl crate::Checkpoints for SqliteCheckpoints {
    async fn load(&self, name: &str) -> Result<Option<u64>, ProjectionError> {
        let key = name.to_owned();
        self.with_conn(name, move |conn| {
            conn.query_row(
                "SELECT position FROM factline_projection_checkpoints WHERE name = ?1",
                [&key],
                |r| r.get::<_, i64>(0).map(|p| p as u64),
            )
            .optional()
        })
        .await
    }

    async fn save(&self, name: &str, position: u64) -> Result<(), ProjectionError> {
        let key = name.to_owned();
        self.with_conn(name, move |conn| {
            conn.execute(
                SAVE_CHECKPOINT,
                params![key, position as i64, chrono::Utc::now().timestamp_micros()],
            )
            .map(|_| ())
        })
        .await
    }
}
