//! The inbox on SQLite, in the consumer's database.

use rusqlite::{params, Connection};
use uuid::Uuid;

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
pub fn first_delivery(conn: &Connection, consumer: &str, event_id: Uuid) -> rusqlite::Result<bool> {
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
pub fn purge(conn: &Connection, cutoff: chrono::DateTime<chrono::Utc>) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM inbox WHERE processed_at < ?1",
        [cutoff.timestamp_micros()],
    )
}
