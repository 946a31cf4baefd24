//! The benchmark baseline: the same rows inserted by plain rusqlite on one
//! connection, with no factline logic in between. `factline bench` reports
//! its own rate as a ratio of this one, measured in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use factline_core::StoreError;
use rusqlite::params;
use uuid::Uuid;

use crate::{db_error, open_connection, schema, SqliteConfig, Synchronous};

/// What the baseline inserted and how long it took.
#[derive(Clone, Copy, Debug)]
pub struct BaselineRun {
    pub events: u64,
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
    let metadata = r#"{"correlation_id":null,"causation_id":null,"schema_version":1,"headers":{}}"#;
    let batch = batch.max(1);
    let started = Instant::now();
    let mut done = 0u64;
    let mut stream = 0u64;
    while done < events && started.elapsed() < budget {
        let tx = conn.transaction().map_err(&err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO events (stream_id, version, category, event_id, event_type, data, metadata, recorded_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(&err)?;
            stream += 1;
            let stream_id = format!("Baseline-{stream}");
            let n = batch.min(events - done);
            for version in 1..=n {
                stmt.execute(params![
                    stream_id,
                    version as i64,
                    "Baseline",
                    Uuid::new_v4().as_bytes().as_slice(),
                    "BenchEvent",
                    data,
                    metadata,
                    chrono::Utc::now().timestamp_micros(),
                ])
                .map_err(&err)?;
            }
            done += n;
        }
        tx.commit().map_err(&err)?;
    }
    Ok(BaselineRun {
        events: done,
        elapsed: started.elapsed(),
    })
}
