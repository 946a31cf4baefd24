//! The registry, checkpoint and lease tables of SQLite and the statements on
//! them.

use super::*;

/// The checkpoints of every projection in a read-model file.
/// The read models' component name in `factline_migrations`.
pub(super) const READ_MODELS: &str = "read_models";

/// Migration 1 of the read models' tables.
pub(super) const CHECKPOINTS: &str = "CREATE TABLE IF NOT EXISTS factline_projection_checkpoints (
    name       TEXT    PRIMARY KEY,
    position   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS factline_projection_versions (
    name           TEXT    PRIMARY KEY,
    active_version INTEGER NOT NULL,
    tables         TEXT    NOT NULL,
    swapped_at     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS factline_parked_events (
    projection TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    position   INTEGER NOT NULL,
    stream_id  TEXT    NOT NULL,
    event_id   TEXT    NOT NULL,
    event_type TEXT    NOT NULL,
    error      TEXT    NOT NULL,
    attempts   INTEGER NOT NULL,
    state      TEXT    NOT NULL,
    parked_at  INTEGER NOT NULL,
    PRIMARY KEY (projection, version, position)
);
CREATE TABLE IF NOT EXISTS factline_projection_controls (
    name       TEXT    PRIMARY KEY,
    paused     INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
)";

/// Migration 2: the definition each version of a declared read model was
/// built from.
pub(super) const DEFINITIONS: &str = "CREATE TABLE IF NOT EXISTS factline_projection_definitions (
    name        TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    fingerprint TEXT    NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
)";

/// The read models' migrations, in order.
pub(super) const MIGRATIONS: &[&str] = &[CHECKPOINTS, DEFINITIONS];

/// Records the definition `version` of `name` is built from, or refuses
/// one that differs from the recorded one.
pub(super) fn check_definition(
    conn: &Connection,
    name: &str,
    version: u32,
    fingerprint: &str,
) -> Result<(), ProjectionError> {
    let failed = read_model_failure(name.to_owned());
    let stored: Option<String> = conn
        .query_row(
            "SELECT fingerprint FROM factline_projection_definitions WHERE name = ?1 AND version = ?2",
            params![name, version],
            |r| r.get(0),
        )
        .optional()
        .map_err(&failed)?;
    match stored {
        Some(stored) if stored != fingerprint => {
            Err(crate::tables::changed_definition(name, version, &stored, fingerprint))
        }
        Some(_) => Ok(()),
        None => conn
            .execute(
                "INSERT INTO factline_projection_definitions (name, version, fingerprint, recorded_at)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (name, version) DO NOTHING",
                params![name, version, fingerprint, chrono::Utc::now().timestamp_micros()],
            )
            .map(|_| ())
            .map_err(&failed),
    }
}

/// Forgets the definition of a dropped version.
pub(super) fn forget_definition(
    conn: &Connection,
    name: &str,
    version: u32,
) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM factline_projection_definitions WHERE name = ?1 AND version = ?2",
        params![name, version],
    )
    .map(|_| ())
}

pub(super) const SAVE_CHECKPOINT: &str =
    "INSERT INTO factline_projection_checkpoints (name, position, updated_at)
     VALUES (?1, ?2, ?3)
     ON CONFLICT (name) DO UPDATE SET position = excluded.position,
                                      updated_at = excluded.updated_at";

/// Moves a checkpoint only from where this sink last saw it (`?4`), so two
/// runners of one projection can never both apply a batch.
pub(super) const MOVE_CHECKPOINT: &str =
    "INSERT INTO factline_projection_checkpoints (name, position, updated_at)
     VALUES (?1, ?2, ?3)
     ON CONFLICT (name) DO UPDATE SET position = excluded.position,
                                      updated_at = excluded.updated_at
     WHERE factline_projection_checkpoints.position = ?4";

pub(super) fn stored_checkpoint(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT position FROM factline_projection_checkpoints WHERE name = ?1")?
        .query_row([key], |r| r.get::<_, i64>(0))
        .optional()
        .map(|p| p.unwrap_or(0) as u64)
}

/// The checkpoint rows of one version: one, or one per partition.
pub(super) const VERSION_CHECKPOINTS: &str =
    "name = ?1 OR substr(name, 1, length(?1) + 1) = ?1 || '#'";

pub(super) fn version_checkpoints(
    conn: &Connection,
    name: &str,
    version: u32,
) -> rusqlite::Result<Vec<String>> {
    let sql =
        format!("SELECT name FROM factline_projection_checkpoints WHERE {VERSION_CHECKPOINTS}");
    let mut stmt = conn.prepare_cached(&sql)?;
    let keys = stmt.query_map([checkpoint_key(name, version, None)], |r| r.get(0))?;
    keys.collect()
}

pub(super) fn delete_checkpoints(
    conn: &Connection,
    name: &str,
    version: u32,
) -> rusqlite::Result<()> {
    let sql = format!("DELETE FROM factline_projection_checkpoints WHERE {VERSION_CHECKPOINTS}");
    conn.execute(&sql, [checkpoint_key(name, version, None)])
        .map(|_| ())
}

pub(super) fn is_paused(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT paused FROM factline_projection_controls WHERE name = ?1")?
        .query_row([name], |r| r.get::<_, bool>(0))
        .optional()
        .map(|p| p.unwrap_or(false))
}

pub(super) fn active_version(conn: &Connection, name: &str) -> rusqlite::Result<Option<Active>> {
    conn.query_row(
        "SELECT active_version, tables FROM factline_projection_versions WHERE name = ?1",
        [name],
        |r| Ok(Active::parse(r.get(0)?, &r.get::<_, String>(1)?)),
    )
    .optional()
}

pub(super) fn register(conn: &Connection, name: &str, tables: &Tables) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO factline_projection_versions (name, active_version, tables, swapped_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET active_version = excluded.active_version,
             tables = excluded.tables, swapped_at = excluded.swapped_at",
        params![
            name,
            tables.version(),
            Active::tables_text(tables.logical()),
            chrono::Utc::now().timestamp_micros()
        ],
    )
    .map(|_| ())
}
