//! Opening the outbox: its connections, prepared statements and caches.

use super::outbox::SqliteOutbox;
use super::schema::*;
use crate::{OutboxError, Publication, LANES};
use rusqlite::{Connection, TransactionBehavior};
use std::path::Path;
use std::sync::{Arc, Mutex};

impl SqliteOutbox {
    /// Opens the outbox of the store at `path` (which must exist: the
    /// store creates its events table), creating its tables if needed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OutboxError> {
        let path = path.as_ref().to_path_buf();
        if !path.exists() {
            return Err(OutboxError::InvalidInput(format!(
                "{} does not exist: open the store there first",
                path.display()
            )));
        }
        let mut conn = sqlite_connection(&path)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let has_events: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events')",
            [],
            |r| r.get(0),
        )?;
        if !has_events {
            return Err(OutboxError::InvalidInput(format!(
                "{} holds no factline store",
                path.display()
            )));
        }
        factline_sqlite::migrate::apply_in(&tx, COMPONENT, &[SQLITE_TABLES])?;
        tx.execute(
            &format!(
                "WITH RECURSIVE n(lane) AS (SELECT 0 UNION ALL SELECT lane + 1 FROM n WHERE lane < {})
                 INSERT OR IGNORE INTO outbox_lanes (lane) SELECT lane FROM n",
                LANES - 1
            ),
            [],
        )?;
        tx.commit()?;
        Ok(SqliteOutbox {
            reader: Arc::new(Mutex::new(sqlite_connection(&path)?)),
            writer: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The store file the outbox lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the writing connection.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        Self::on(self.writer.clone(), work).await
    }

    /// Runs `work` on the reading connection.
    pub(super) async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        Self::on(self.reader.clone(), work).await
    }

    pub(super) async fn on<T: Send + 'static>(
        conn: Arc<Mutex<Connection>>,
        work: impl FnOnce(&mut Connection) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| OutboxError::internal("the outbox connection was poisoned"))?;
            work(&mut conn)
        })
        .await
        .map_err(|e| OutboxError::internal(format!("an outbox task failed: {e}")))?
    }
}

pub(super) fn sqlite_publications(conn: &Connection) -> rusqlite::Result<Vec<Publication>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, category, event_type, subject, key FROM outbox_publications ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Publication {
            id: r.get(0)?,
            category: r.get(1)?,
            event_type: r.get(2)?,
            subject: r.get(3)?,
            key: r.get(4)?,
        })
    })?;
    rows.collect()
}
