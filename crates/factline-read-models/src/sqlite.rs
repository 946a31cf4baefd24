//! Reading declared read models in SQLite: read-only connections, each
//! answer one read transaction with the read model's position.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use factline_core::StorageError;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use serde_json::{Map, Value};

use crate::query::{Answer, Plan, QueryError};

/// Idle read-only connections to one file.
pub(crate) struct SqliteReader {
    path: PathBuf,
    idle: std::sync::Arc<Mutex<Vec<Connection>>>,
}

/// Idle connections kept for the next request.
const KEEP_IDLE: usize = 8;

fn failed(context: &str, e: rusqlite::Error) -> QueryError {
    QueryError::Storage(factline_sqlite::sql::storage_error(context, e))
}

impl SqliteReader {
    pub fn new(path: &Path) -> Self {
        SqliteReader {
            path: path.to_owned(),
            idle: Default::default(),
        }
    }

    /// Runs `work` on a read-only connection on a blocking thread.
    async fn with_conn<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, QueryError> + Send + 'static,
    ) -> Result<T, QueryError> {
        let (path, idle) = (self.path.clone(), self.idle.clone());
        tokio::task::spawn_blocking(move || {
            let taken = idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match taken {
                Some(conn) => conn,
                None => {
                    // Read-only: a query cannot write, whatever its SQL.
                    let conn = Connection::open_with_flags(
                        &path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .map_err(|e| failed(&format!("opening {}", path.display()), e))?;
                    conn.busy_timeout(Duration::from_secs(5))
                        .map_err(|e| failed("configuring the connection", e))?;
                    conn
                }
            };
            let result = work(&conn);
            let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < KEEP_IDLE {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| {
            QueryError::Storage(StorageError::with_source("a read-model query panicked", e))
        })?
    }

    pub async fn position(&self, name: &str) -> Result<u64, QueryError> {
        // No file yet: nothing has been applied.
        if !self.path.exists() {
            return Ok(0);
        }
        let name = name.to_owned();
        self.with_conn(move |conn| {
            not_created_yet(factline_projections::sqlite::active_position(conn, &name))
                .map(|p| p.unwrap_or(0))
                .map_err(|e| failed("reading the read model's position", e))
        })
        .await
    }

    pub async fn run(&self, plan: Plan) -> Result<Answer, QueryError> {
        if !self.path.exists() {
            return Ok(plan.answer(Vec::new(), 0));
        }
        self.with_conn(move |conn| {
            // One read transaction: the position and the rows of one
            // snapshot.
            conn.execute_batch("BEGIN")
                .map_err(|e| failed("starting a read", e))?;
            let answer = read(conn, &plan);
            let _ = conn.execute_batch("COMMIT");
            answer
        })
        .await
    }
}

/// A file whose registry no runner has created yet has applied nothing.
fn not_created_yet(position: rusqlite::Result<Option<u64>>) -> rusqlite::Result<Option<u64>> {
    match position {
        Err(e) if e.to_string().contains("no such table") => Ok(None),
        other => other,
    }
}

fn read(conn: &Connection, plan: &Plan) -> Result<Answer, QueryError> {
    let position = not_created_yet(factline_projections::sqlite::active_position(
        conn,
        &plan.read_model,
    ))
    .map_err(|e| failed("reading the read model's position", e))?;
    let Some(position) = position else {
        // Nothing applied yet: its tables do not exist.
        return Ok(plan.answer(Vec::new(), 0));
    };
    let sql = plan.sql_for("", "q.*");
    let mut stmt = conn
        .prepare_cached(&sql)
        .map_err(|e| failed("preparing the query", e))?;
    let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let mut rows = stmt
        .query(rusqlite::params_from_iter(&plan.params))
        .map_err(|e| failed("querying the read model", e))?;
    let mut out = Vec::new();
    while let Some(row) = rows
        .next()
        .map_err(|e| failed("querying the read model", e))?
    {
        let mut object = Map::new();
        for (i, name) in names.iter().enumerate() {
            let value = match row.get_ref(i).map_err(|e| failed("reading a row", e))? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(n) => Value::from(n),
                ValueRef::Real(f) => {
                    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
                }
                ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => Value::String(b.iter().map(|x| format!("{x:02x}")).collect()),
            };
            object.insert(name.clone(), value);
        }
        out.push(object);
    }
    Ok(plan.answer(out, position))
}
