//! The outbox's tables and trigger, created when the outbox opens.

use crate::{OutboxError, LANES};
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

pub(super) fn sqlite_connection(path: &Path) -> Result<Connection, OutboxError> {
    factline_core::backend::create_private_file(path)
        .map_err(|e| OutboxError::internal(format!("creating {}: {e}", path.display())))?;
    let mut conn = Connection::open(path)?;
    // SQLite's own busy handler backs off to 100 ms sleeps; under a busy
    // writer a mark or heartbeat would stall the relay that long. Look
    // again every millisecond instead, for up to 10 s.
    conn.busy_handler(Some(|attempt: i32| {
        std::thread::sleep(Duration::from_millis(1));
        attempt < 10_000
    }))?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    // A lost last mark republishes a record, which sinks deduplicate.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

pub(super) const SQLITE_TABLES: &str = "
    CREATE TABLE IF NOT EXISTS outbox_publications (
        id         INTEGER PRIMARY KEY,
        category   TEXT,
        event_type TEXT,
        subject    TEXT    NOT NULL,
        key        TEXT    NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS outbox (
        position     INTEGER PRIMARY KEY,
        stream_no    INTEGER NOT NULL,
        lane         INTEGER NOT NULL,
        publication  INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        published_at INTEGER,
        attempts     INTEGER NOT NULL DEFAULT 0,
        last_error   TEXT
    );
    CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (position) WHERE published_at IS NULL;
    CREATE INDEX IF NOT EXISTS outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;
    CREATE TABLE IF NOT EXISTS outbox_lanes (
        lane       INTEGER PRIMARY KEY,
        holder     TEXT,
        expires_at INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE IF NOT EXISTS outbox_parked (
        position  INTEGER PRIMARY KEY,
        error     TEXT    NOT NULL,
        parked_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS outbox_relays (
        relay   TEXT    PRIMARY KEY,
        seen_at INTEGER NOT NULL
    );";

/// Runs inside the append's statement: the first matching publication
/// (lowest id) decides the record.
pub(super) fn sqlite_trigger() -> String {
    format!(
        "CREATE TRIGGER IF NOT EXISTS outbox_capture AFTER INSERT ON events
         BEGIN
             INSERT INTO outbox (position, stream_no, lane, publication, created_at)
             SELECT NEW.position, NEW.stream_no, NEW.stream_no % {LANES}, p.id, NEW.recorded_at
             FROM outbox_publications p
             WHERE (p.category IS NULL OR p.category = NEW.category)
               AND (p.event_type IS NULL OR p.event_type = NEW.event_type)
             ORDER BY p.id LIMIT 1;
         END;"
    )
}

/// The outbox's component name in `factline_migrations`.
pub(super) const COMPONENT: &str = "outbox";
