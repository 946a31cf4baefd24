//! Opening the outbox: its connections, prepared statements and caches.

use super::outbox::PostgresOutbox;
use super::quote_ident;
use super::schema::*;
use crate::{OutboxError, Publication};
use std::sync::Mutex;

impl PostgresOutbox {
    /// Connects to the outbox of the store in `schema` (which must exist:
    /// the store creates it), creating its tables if needed.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, OutboxError> {
        let (mut client, connection) = pg_connect(url).await?;
        let tx = client.transaction().await?;
        factline_postgres::migrate::lock_and_prepare(&tx, schema).await?;
        let has_events: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.tables
                                WHERE table_schema = $1 AND table_name = 'events')",
                &[&schema],
            )
            .await?
            .get(0);
        if !has_events {
            return Err(OutboxError::InvalidInput(format!(
                "the schema {schema:?} holds no factline store"
            )));
        }
        // Once migrated, nothing is taken: DDL locks the outbox tables, and
        // against a running relay's marks that can deadlock. Outboxes of
        // earlier builds recorded no migrations: what they have is adopted.
        let set_up: (bool, bool) = {
            let row = tx
                .query_one(
                    "SELECT to_regclass(quote_ident($1) || '.outbox_done') IS NOT NULL,
                            to_regclass(quote_ident($1) || '.outbox_marks') IS NOT NULL",
                    &[&schema],
                )
                .await?;
            (row.get(0), row.get(1))
        };
        let recorded = factline_postgres::migrate::version_in(&tx, schema, COMPONENT).await?;
        if recorded == 0 {
            let adopted = match set_up {
                (true, true) => 2,
                (true, false) => 1,
                _ => 0,
            };
            factline_postgres::migrate::adopt(&tx, schema, COMPONENT, adopted).await?;
        }
        let migrations = migrations();
        let migrations: Vec<&str> = migrations.iter().map(String::as_str).collect();
        factline_postgres::migrate::apply_in(&tx, schema, COMPONENT, &migrations).await?;
        tx.commit().await?;
        // A mark lost in a crash republishes its records (which sinks
        // deduplicate), and a lost lease renewal only expires sooner: no
        // commit of this connection needs to wait for the disk.
        client.batch_execute("SET synchronous_commit = off").await?;
        let (reader, reader_connection) = pg_connect(url).await?;
        // The reader's statements are prepared once and their best plans do
        // not depend on the values bound: planning the fetch afresh on every
        // call (PostgreSQL's custom plans) cost a third of its execution.
        reader
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .await?;
        Ok(PostgresOutbox {
            client: tokio::sync::Mutex::new(client),
            reader: tokio::sync::Mutex::new(reader),
            lanes_sql: tokio::sync::OnceCell::new(),
            pending_sql: tokio::sync::OnceCell::new(),
            mark_sql: tokio::sync::OnceCell::new(),
            streams_sql: tokio::sync::OnceCell::new(),
            stream_ids: Mutex::default(),
            templates: Mutex::default(),
            schema: quote_ident(schema),
            connections: vec![connection, reader_connection],
        })
    }

    pub(super) async fn publications_in(
        client: &impl tokio_postgres::GenericClient,
        s: &str,
    ) -> Result<Vec<Publication>, OutboxError> {
        let rows = client
            .query(
                &format!(
                    "SELECT id, category, event_type, subject, key FROM {s}.outbox_publications ORDER BY id"
                ),
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Publication {
                id: r.get(0),
                category: r.get(1),
                event_type: r.get(2),
                subject: r.get(3),
                key: r.get(4),
            })
            .collect())
    }
}

/// A statement of `cell`, prepared on `client` the first time.
pub(super) async fn prepared<'a>(
    cell: &'a tokio::sync::OnceCell<tokio_postgres::Statement>,
    client: &tokio_postgres::Client,
    sql: impl FnOnce() -> String,
) -> Result<&'a tokio_postgres::Statement, tokio_postgres::Error> {
    cell.get_or_try_init(|| async { client.prepare(&sql()).await })
        .await
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, OutboxError> {
    mutex
        .lock()
        .map_err(|_| OutboxError::internal("an outbox cache was poisoned".to_owned()))
}

/// Entries a cache holds before it starts over.
pub(super) const CACHE_LIMIT: usize = 100_000;

impl PostgresOutbox {
    /// Reads the ids of the streams in `rows` (column 1) not yet known.
    pub(super) async fn learn_streams(
        &self,
        client: &tokio_postgres::Client,
        rows: &[tokio_postgres::Row],
    ) -> Result<(), OutboxError> {
        let unknown: Vec<i64> = {
            let known = lock(&self.stream_ids)?;
            let mut unknown: Vec<i64> = rows
                .iter()
                .map(|r| r.get::<_, i64>(1))
                .filter(|no| !known.contains_key(no))
                .collect();
            unknown.sort_unstable();
            unknown.dedup();
            unknown
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let s = &self.schema;
        let streams_sql = prepared(&self.streams_sql, client, || {
            format!("SELECT stream_no, stream_id FROM {s}.streams WHERE stream_no = ANY($1)")
        })
        .await?;
        let found = client.query(streams_sql, &[&unknown]).await?;
        let mut known = lock(&self.stream_ids)?;
        if known.len() + found.len() > CACHE_LIMIT {
            known.clear();
        }
        for row in &found {
            known.insert(row.get(0), row.get(1));
        }
        Ok(())
    }

    /// Reloads the publications when `rows` (column 3) name one not known.
    pub(super) async fn learn_templates(
        &self,
        client: &tokio_postgres::Client,
        rows: &[tokio_postgres::Row],
    ) -> Result<(), OutboxError> {
        let complete = {
            let known = lock(&self.templates)?;
            rows.iter().all(|r| known.contains_key(&r.get::<_, i64>(3)))
        };
        if complete {
            return Ok(());
        }
        let publications = Self::publications_in(client, &self.schema).await?;
        let mut known = lock(&self.templates)?;
        for publication in publications {
            known.insert(publication.id, publication);
        }
        Ok(())
    }
}

pub(super) fn pg_positions(positions: &[u64]) -> Vec<i64> {
    positions.iter().map(|&p| p as i64).collect()
}
