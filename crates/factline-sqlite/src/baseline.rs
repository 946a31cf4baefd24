//! The benchmark baseline: the same rows inserted by plain rusqlite on one
//! connection, with no factline logic in between. `factline bench` reports
//! its own rate as a ratio of this one, measured in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use factline_core::StoreError;
use rusqlite::params;

use crate::{db_error, open_connection, schema, SqliteConfig, Synchronous};

/// What the baseline inserted and how long it took.
#[derive(Clone, Copy, Debug)]
pub struct BaselineRun {
    /// How many events it inserted.
    pub events: u64,
    /// How long that took.
    pub elapsed: Duration,
}

/// Inserts up to `events` rows of `data` into a fresh database at `path`
/// with the store's schema and pragmas, `batch` rows per transaction. Stops
/// early once `budget` has passed, so a slow baseline (one fsync per row)
/// cannot stall the benchmark; the rate stays comparable.
pub fn insert_rows(
    path: &Path,
    synchronous: Synchronous,
    data: &str,
    events: u64,
    batch: u64,
    budget: Duration,
) -> Result<BaselineRun, StoreError> {
    let mut config = SqliteConfig::new(path);
    config.synchronous = synchronous;
    let mut conn = open_connection(&config, false)?;
    schema::migrate(&mut conn)?;
    let err = db_error("baseline insert");
    // A plain application keeps SQLite's own checkpointing.
    conn.pragma_update(None, "wal_autocheckpoint", 1000)
        .map_err(&err)?;
    // Default metadata, which the store keeps as NULL.
    let metadata: Option<&str> = None;
    let batch = batch.max(1);
    let started = Instant::now();
    let mut done = 0u64;
    let mut stream = 0u64;
    while done < events && started.elapsed() < budget {
        let tx = conn.transaction().map_err(&err)?;
        {
            // The rows factline writes for an append to a new stream: the
            // stream, its events, and the stream's new version.
            stream += 1;
            let n = batch.min(events - done);
            tx.prepare_cached(
                "INSERT INTO streams (stream_id, category, version) VALUES (?1, ?2, 0)",
            )
            .and_then(|mut s| s.execute(params![format!("Baseline-{stream}"), "Baseline"]))
            .map_err(&err)?;
            let stream_no = tx.last_insert_rowid();
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO events (stream_no, version, category, event_id, event_type, data, metadata, recorded_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(&err)?;
            for version in 1..=n {
                stmt.execute(params![
                    stream_no,
                    version as i64,
                    "Baseline",
                    factline_core::new_event_id().as_bytes().as_slice(),
                    "BenchEvent",
                    data,
                    metadata,
                    chrono::Utc::now().timestamp_micros(),
                ])
                .map_err(&err)?;
            }
            tx.prepare_cached("UPDATE streams SET version = ?1 WHERE stream_no = ?2")
                .and_then(|mut s| s.execute(params![n as i64, stream_no]))
                .map_err(&err)?;
            done += n;
        }
        tx.commit().map_err(&err)?;
    }
    Ok(BaselineRun {
        events: done,
        elapsed: started.elapsed(),
    })
}
