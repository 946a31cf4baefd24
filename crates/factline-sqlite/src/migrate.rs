//! The one migration mechanism of every table factline keeps in a SQLite
//! file: the store's, the read models' registry and checkpoints, the
//! outbox's. Each component has numbered migrations, applied in order and
//! recorded in `factline_migrations` inside one write transaction, which
//! SQLite's write lock serializes between processes. A migration is never
//! edited once released; a change is a new one.

use factline_core::StorageError;
use rusqlite::{params, Connection, Transaction, TransactionBehavior};

use crate::sql::storage_error;

const TABLE: &str = "CREATE TABLE IF NOT EXISTS factline_migrations (
    component  TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    applied_at INTEGER NOT NULL,
    PRIMARY KEY (component, version)
)";

/// Brings `component` up to `migrations.len()` in a write transaction of
/// its own. Fails, changing nothing, when the file holds a newer version
/// of the component than this build knows.
pub fn apply(
    conn: &mut Connection,
    component: &str,
    migrations: &[&str],
) -> Result<(), StorageError> {
    // Up to date (the usual case): a read says so, without the write lock
    // that every open would otherwise wait for.
    if version(conn, component).is_ok_and(|v| v == migrations.len() as i64) {
        return Ok(());
    }
    let failed = |e| storage_error("migrating the database", e);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed)?;
    apply_in(&tx, component, migrations)?;
    tx.commit().map_err(failed)
}

/// [`apply`] inside a write transaction the caller holds (and commits).
pub fn apply_in(
    tx: &Transaction<'_>,
    component: &str,
    migrations: &[&str],
) -> Result<(), StorageError> {
    let failed = |e| storage_error("migrating the database", e);
    tx.execute_batch(TABLE).map_err(failed)?;
    let current = version(tx, component).map_err(failed)?;
    let known = migrations.len() as i64;
    if current > known {
        return Err(StorageError::new(format!(
            "the database's {component} tables are at version {current}, newer than this build's {known}; upgrade factline"
        )));
    }
    let now = chrono::Utc::now().timestamp_micros();
    for (index, sql) in migrations.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql).map_err(failed)?;
        tx.execute(
            "INSERT INTO factline_migrations (component, version, applied_at) VALUES (?1, ?2, ?3)",
            params![component, index as i64 + 1, now],
        )
        .map_err(failed)?;
    }
    Ok(())
}

/// The version `component` is at: the last migration recorded, 0 if none.
pub fn version(conn: &Connection, component: &str) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT coalesce(max(version), 0) FROM factline_migrations WHERE component = ?1",
        [component],
        |r| r.get(0),
    )
}

/// Records `component` as being at `version` without running anything: for
/// tables an earlier build created and tracked otherwise.
pub fn adopt(tx: &Transaction<'_>, component: &str, version: i64) -> rusqlite::Result<()> {
    tx.execute_batch(TABLE)?;
    let now = chrono::Utc::now().timestamp_micros();
    for v in 1..=version {
        tx.execute(
            "INSERT OR IGNORE INTO factline_migrations (component, version, applied_at) VALUES (?1, ?2, ?3)",
            params![component, v, now],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_in_order_and_newer_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let first = [
            "CREATE TABLE a (x INTEGER)",
            "ALTER TABLE a ADD COLUMN y INTEGER",
        ];
        let mut conn = Connection::open(&path).unwrap();
        apply(&mut conn, "thing", &first[..1]).unwrap();
        apply(&mut conn, "thing", &first).unwrap();
        // Again: nothing left to run (the ALTER would fail if it ran twice).
        apply(&mut conn, "thing", &first).unwrap();
        assert_eq!(version(&conn, "thing").unwrap(), 2);
        assert_eq!(version(&conn, "other").unwrap(), 0);
        let refused = apply(&mut conn, "thing", &first[..1]).unwrap_err();
        assert!(
            refused.to_string().contains("newer than this build's 1"),
            "{refused}"
        );
        // A failing migration leaves the component where it was.
        let broken = [first[0], first[1], "NOT SQL"];
        assert!(apply(&mut conn, "thing", &broken).is_err());
        assert_eq!(version(&conn, "thing").unwrap(), 2);
    }

    #[test]
    fn processes_opening_a_new_file_at_once_migrate_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut conn = Connection::open(&path).unwrap();
                    conn.busy_timeout(std::time::Duration::from_secs(10))
                        .unwrap();
                    apply(&mut conn, "thing", &["CREATE TABLE a (x INTEGER)"])
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap().unwrap();
        }
        let conn = Connection::open(&path).unwrap();
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM factline_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }

    #[tokio::test]
    async fn a_store_an_earlier_build_made_is_adopted_not_migrated_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        drop(crate::SqliteStore::open(&path).unwrap());
        // As an earlier build left it: the version in user_version only.
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "DELETE FROM factline_migrations WHERE component = 'store'",
            [],
        )
        .unwrap();
        drop(conn);
        // Running migration 1 again would fail: its tables exist.
        drop(crate::SqliteStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        assert_eq!(version(&conn, "store").unwrap(), crate::SCHEMA_VERSION);
    }
}
