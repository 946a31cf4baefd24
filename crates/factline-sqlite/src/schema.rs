//! Versioned schema migrations, tracked in SQLite's `user_version`.

use factline_core::{StorageError, StoreError};
use rusqlite::{Connection, TransactionBehavior};

use crate::db_error;

/// Each entry upgrades the schema from version `index` to `index + 1`.
/// Entries are never edited once released; changes are new entries.
const MIGRATIONS: &[&str] = &[
    // 1: streams and the event log.
    //
    // Streams get a sequential number, and events are indexed by
    // (stream_no, version). Streams created recently are the ones being
    // written, so their index entries sit together at the end of the index
    // and a group commit dirties a few pages instead of one per stream.
    // `streams.version` is the current version, read and bumped by the
    // writer instead of computing MAX(version).
    //
    // AUTOINCREMENT keeps positions from ever being reused, even if the
    // newest rows are removed by a future retention policy, so "strictly
    // increasing" holds for the life of the file.
    "CREATE TABLE streams (
        stream_no INTEGER PRIMARY KEY,
        stream_id TEXT    NOT NULL UNIQUE,
        category  TEXT    NOT NULL,
        version   INTEGER NOT NULL
    );
    CREATE TABLE events (
        position    INTEGER PRIMARY KEY AUTOINCREMENT,
        stream_no   INTEGER NOT NULL,
        version     INTEGER NOT NULL,
        category    TEXT    NOT NULL,
        event_id    BLOB    NOT NULL,
        event_type  TEXT    NOT NULL,
        data        TEXT    NOT NULL,
        metadata    TEXT,              -- NULL: default metadata
        recorded_at INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX events_stream_version ON events (stream_no, version);
    CREATE UNIQUE INDEX events_event_id ON events (event_id);
    CREATE INDEX events_category_position ON events (category, position);",
    // 2: command idempotency keys (C3) and snapshots (C4).
    //
    // A command's key and result are written by the writer in the append's
    // own transaction; event ids are 16 bytes each, concatenated.
    // `recorded_at` (microseconds) is indexed for the retention purge.
    "CREATE TABLE commands (
        key            TEXT    PRIMARY KEY,
        fingerprint    TEXT    NOT NULL,
        stream_id      TEXT    NOT NULL,
        first_version  INTEGER NOT NULL,
        last_version   INTEGER NOT NULL,
        first_position INTEGER NOT NULL,
        last_position  INTEGER NOT NULL,
        event_ids      BLOB    NOT NULL,
        recorded_at    INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX commands_recorded_at ON commands (recorded_at);
    CREATE TABLE snapshots (
        stream_id        TEXT    PRIMARY KEY,
        version          INTEGER NOT NULL,
        snapshot_version INTEGER NOT NULL,
        data             TEXT    NOT NULL,
        recorded_at      INTEGER NOT NULL
    );",
];

/// The schema version this build creates and reads (SQLite's `user_version`).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the store's tables up to date through the one migration
/// mechanism ([`crate::migrate`], component `store`). Safe when several
/// processes open the same file at once: the check and the upgrade run in
/// one write transaction. Files of earlier builds tracked the version in
/// `user_version` only: it is adopted, and kept up to date for them.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let failed = db_error("migrating the schema");
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&failed)?;
    let legacy: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(&failed)?;
    if legacy > SCHEMA_VERSION {
        return Err(StorageError::new(format!(
            "the database has schema version {legacy}, newer than this build's {SCHEMA_VERSION}; upgrade factline"
        ))
        .into());
    }
    crate::migrate::adopt(&tx, STORE, legacy).map_err(&failed)?;
    crate::migrate::apply_in(&tx, STORE, MIGRATIONS)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(&failed)?;
    tx.commit().map_err(failed)
}

/// The store's component name in `factline_migrations`.
pub const STORE: &str = "store";
