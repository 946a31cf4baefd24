//! The consumer side (O5): record each processed event id in the
//! consumer's own transaction, so a redelivered message is acknowledged
//! and ignored, and the consumer's state changes exactly once.
//!
//! ```text
//! let tx = conn.transaction()?;
//! if inbox::sqlite::first_delivery(&tx, "billing", event_id)? {
//!     apply(&tx, &event)?;          // the consumer's own writes
//! }
//! tx.commit()?;                     // then acknowledge the message
//! ```

use uuid::Uuid;

/// On SQLite, in the consumer's database.
pub mod sqlite {
    use super::*;
    use rusqlite::{params, Connection};

    /// Creates the inbox table if needed.
    pub fn setup(conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS inbox (
                 consumer     TEXT    NOT NULL,
                 event_id     BLOB    NOT NULL,
                 processed_at INTEGER NOT NULL,
                 PRIMARY KEY (consumer, event_id)
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS inbox_processed_at ON inbox (processed_at);",
        )
    }

    /// Records `event_id` as processed by `consumer` inside `conn`'s open
    /// transaction; `false` when it already was (a redelivery: skip it).
    pub fn first_delivery(
        conn: &Connection,
        consumer: &str,
        event_id: Uuid,
    ) -> rusqlite::Result<bool> {
        let inserted = conn
            .prepare_cached(
                "INSERT INTO inbox (consumer, event_id, processed_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                consumer,
                event_id.as_bytes().as_slice(),
                chrono::Utc::now().timestamp_micros()
            ])?;
        Ok(inserted == 1)
    }

    /// Forgets ids processed before `cutoff` (older than any redelivery).
    pub fn purge(
        conn: &Connection,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> rusqlite::Result<usize> {
        conn.execute(
            "DELETE FROM inbox WHERE processed_at < ?1",
            [cutoff.timestamp_micros()],
        )
    }
}

/// On PostgreSQL, in the consumer's database.
pub mod postgres {
    use super::*;
    use crate::db::quote_ident;
    use tokio_postgres::GenericClient;

    /// Creates `schema.inbox` if needed (the schema must exist).
    pub async fn setup(
        client: &impl GenericClient,
        schema: &str,
    ) -> Result<(), tokio_postgres::Error> {
        let s = quote_ident(schema);
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {s}.inbox (
                     consumer     text        NOT NULL,
                     event_id     uuid        NOT NULL,
                     processed_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (consumer, event_id)
                 );
                 CREATE INDEX IF NOT EXISTS inbox_processed_at ON {s}.inbox (processed_at);"
            ))
            .await
    }

    /// Records `event_id` as processed by `consumer` inside the open
    /// transaction `tx`; `false` when it already was.
    pub async fn first_delivery(
        tx: &impl GenericClient,
        schema: &str,
        consumer: &str,
        event_id: Uuid,
    ) -> Result<bool, tokio_postgres::Error> {
        let s = quote_ident(schema);
        let inserted = tx
            .execute(
                &format!(
                    "INSERT INTO {s}.inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
                ),
                &[&consumer, &event_id],
            )
            .await?;
        Ok(inserted == 1)
    }

    pub async fn purge(
        client: &impl GenericClient,
        schema: &str,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, tokio_postgres::Error> {
        let s = quote_ident(schema);
        client
            .execute(
                &format!("DELETE FROM {s}.inbox WHERE processed_at < $1"),
                &[&cutoff],
            )
            .await
    }
}
