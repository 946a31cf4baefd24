//! Benchmark baselines: the same rows written by plain SQL on the same
//! server, with no factline logic in between. `factline bench` reports its
//! own rate as a ratio of these, measured in the same run.
//!
//! The baseline table has the event table's columns and indexes; its
//! positions come from an identity column, the usual plain way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use factline_core::{StorageError, StoreError};
use futures_util::SinkExt;
use tokio_postgres::{Client, NoTls, Statement};

use crate::schema::{quote_ident, validate_schema_name};
use crate::sql::pg_error;

/// How the baseline writes its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// One single-row INSERT per transaction (autocommit).
    RowPerTransaction,
    /// One multi-row INSERT of a batch per transaction.
    MultiRowInsert,
    /// One COPY of a batch per transaction.
    Copy,
}

/// What a baseline wrote and how long it took.
#[derive(Clone, Copy, Debug)]
pub struct BaselineRun {
    /// How many events it inserted.
    pub events: u64,
    /// How long that took.
    pub elapsed: Duration,
}

/// Writes up to `events` rows of `data` into a fresh table in `schema`
/// (dropped first if it exists) over `connections` concurrent connections,
/// `batch` rows per transaction (1 for [`Method::RowPerTransaction`]).
/// Stops early once `budget` has passed; the rate stays comparable.
#[allow(clippy::too_many_arguments)]
pub async fn insert_rows(
    url: &str,
    schema: &str,
    method: Method,
    connections: usize,
    batch: u64,
    events: u64,
    data: &str,
    budget: Duration,
) -> Result<BaselineRun, StoreError> {
    validate_schema_name(schema)?;
    let s = quote_ident(schema);
    let table = format!("{s}.baseline_events");
    let setup = connect(url).await?;
    setup
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {s} CASCADE;
             CREATE SCHEMA {s};
             CREATE TABLE {table} (
                 position    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 stream_no   bigint      NOT NULL,
                 version     bigint      NOT NULL,
                 category    text        NOT NULL,
                 event_id    uuid        NOT NULL UNIQUE,
                 event_type  text        NOT NULL,
                 data        json        NOT NULL,
                 metadata    json,
                 recorded_at timestamptz NOT NULL,
                 UNIQUE (stream_no, version)
             );
             CREATE INDEX ON {table} (category, position);"
        ))
        .await
        .map_err(|e| pg_error("creating the baseline table", e))?;
    checkpoint(url).await?;
    let batch = if method == Method::RowPerTransaction {
        1
    } else {
        batch.max(1)
    };
    let claimed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::with_capacity(connections.max(1));
    for _ in 0..connections.max(1) {
        clients.push(connect(url).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, client) in clients.into_iter().enumerate() {
        let (claimed, table, data) = (claimed.clone(), table.clone(), data.to_string());
        tasks.push(tokio::spawn(async move {
            let statement = match insert_sql(method, &table) {
                Some(sql) => Some(
                    client
                        .prepare(&sql)
                        .await
                        .map_err(|e| pg_error("preparing the baseline insert", e))?,
                ),
                None => None,
            };
            let mut written = 0u64;
            // Each connection writes its own streams, ten batches apiece.
            let mut round = 0u64;
            while started.elapsed() < budget {
                let first = claimed.fetch_add(batch, Ordering::Relaxed);
                if first >= events {
                    break;
                }
                let rows = batch.min(events - first);
                let stream_no = (n as i64) << 32 | (round / 10) as i64;
                let first_version = (round % 10 * batch) as i64 + 1;
                let target = match (&statement, method) {
                    (Some(insert), Method::RowPerTransaction) => Target::InsertOne(insert),
                    (Some(insert), _) => Target::InsertMany(insert),
                    (None, _) => Target::Copy(&table),
                };
                write_batch(&client, target, stream_no, first_version, rows, &data).await?;
                written += rows;
                round += 1;
            }
            Ok::<u64, StoreError>(written)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task
            .await
            .map_err(|e| StorageError::new(format!("a baseline task failed: {e}")))??;
    }
    let elapsed = started.elapsed();
    drop(setup);
    drop_schema(url, schema).await?;
    Ok(BaselineRun {
        events: total,
        elapsed,
    })
}

/// Drops a schema and everything in it, if it exists: benches clean up
/// after themselves with this.
pub async fn drop_schema(url: &str, schema: &str) -> Result<(), StoreError> {
    validate_schema_name(schema)?;
    connect(url)
        .await?
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(schema)
        ))
        .await
        .map_err(|e| pg_error("dropping a schema", e))
}

/// Vacuums and analyzes every table of `schema`, so that a measurement
/// after a bulk load does not share the machine with the autovacuum that
/// the load set off (nor run on the planner's estimates from before it).
pub async fn vacuum_schema(url: &str, schema: &str) -> Result<(), StoreError> {
    validate_schema_name(schema)?;
    let client = connect(url).await?;
    let tables = client
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY tablename",
            &[&schema],
        )
        .await
        .map_err(|e| pg_error("listing a schema's tables", e))?;
    for table in tables {
        let table: String = table.get(0);
        client
            .batch_execute(&format!(
                "VACUUM (ANALYZE) {}.{}",
                quote_ident(schema),
                quote_ident(&table)
            ))
            .await
            .map_err(|e| pg_error("vacuuming", e))?;
    }
    Ok(())
}

/// Runs a CHECKPOINT so that a measurement does not pay for the previous
/// one's dirty pages and full-page writes. Best effort: without the right
/// (superuser or `pg_checkpoint`) it does nothing and says so.
pub async fn checkpoint(url: &str) -> Result<bool, StoreError> {
    match connect(url).await?.batch_execute("CHECKPOINT").await {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            Ok(false)
        }
        Err(e) => Err(pg_error("checkpoint", e)),
    }
}

async fn connect(url: &str) -> Result<Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| pg_error("connecting the baseline", e))?;
    tokio::spawn(connection);
    Ok(client)
}

/// The INSERT a method runs, if it runs one.
fn insert_sql(method: Method, table: &str) -> Option<String> {
    let columns = "(stream_no, version, category, event_id, event_type, data, recorded_at)";
    match method {
        Method::RowPerTransaction => Some(format!(
            "INSERT INTO {table} {columns}
             VALUES ($1, $2, 'Baseline', $3, 'BenchEvent', $4::text::json, now())"
        )),
        Method::MultiRowInsert => Some(format!(
            "INSERT INTO {table} {columns}
             SELECT $1, u.version, 'Baseline', u.event_id, 'BenchEvent', u.data::json, now()
             FROM unnest($2::bigint[], $3::uuid[], $4::text[]) AS u(version, event_id, data)"
        )),
        Method::Copy => None,
    }
}

enum Target<'a> {
    InsertOne(&'a Statement),
    InsertMany(&'a Statement),
    /// COPY into this table.
    Copy(&'a str),
}

async fn write_batch(
    client: &Client,
    target: Target<'_>,
    stream_no: i64,
    first_version: i64,
    rows: u64,
    data: &str,
) -> Result<(), StoreError> {
    let err = |e| pg_error("baseline insert", e);
    let ids: Vec<uuid::Uuid> = (0..rows).map(|_| factline_core::new_event_id()).collect();
    let versions: Vec<i64> = (0..rows as i64).map(|i| first_version + i).collect();
    match target {
        Target::InsertOne(statement) => {
            client
                .execute(statement, &[&stream_no, &versions[0], &ids[0], &data])
                .await
                .map_err(err)?;
        }
        Target::InsertMany(statement) => {
            // Every row carries its own data, as real events do.
            let data = vec![data; ids.len()];
            client
                .execute(statement, &[&stream_no, &versions, &ids, &data])
                .await
                .map_err(err)?;
        }
        Target::Copy(table) => {
            let sink = client
                .copy_in::<_, Bytes>(&format!(
                    "COPY {table} (stream_no, version, category, event_id, event_type, data, recorded_at)
                     FROM STDIN (FORMAT csv)"
                ))
                .await
                .map_err(err)?;
            let quoted = data.replace('"', "\"\"");
            let now = chrono::Utc::now().to_rfc3339();
            let mut text = String::with_capacity(rows as usize * (quoted.len() + 96));
            for (id, version) in ids.iter().zip(&versions) {
                text.push_str(&format!(
                    "{stream_no},{version},Baseline,{id},BenchEvent,\"{quoted}\",{now}\n"
                ));
            }
            futures_util::pin_mut!(sink);
            sink.send(Bytes::from(text)).await.map_err(err)?;
            sink.finish().await.map_err(err)?;
        }
    }
    Ok(())
}
