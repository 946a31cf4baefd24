//! The outbox's tables, on SQLite and PostgreSQL: publications, records,
//! lanes and relays.
//!
//! Records are written by a trigger on the store's events table, created
//! with the first publication and dropped with the last, so appends pay
//! nothing while nothing is published. The trigger runs inside the
//! append's statement, hence its transaction: rollbacks take the record
//! with them, and every process that appends writes records, configured
//! or not.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use uuid::Uuid;

use crate::message::StoredEvent;
use crate::{Message, OutboxError, Publication, DEFAULT_KEY, DEFAULT_SUBJECT, LANES};

/// What `factline outbox status` and the admin API show.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutboxStatus {
    pub publications: Vec<Publication>,
    /// Records not yet published.
    pub backlog: u64,
    /// When the oldest unpublished record's event was recorded.
    pub oldest_pending_at: Option<DateTime<Utc>>,
    /// Its age in seconds (0 with no backlog).
    pub oldest_age_s: f64,
    /// Published records not yet removed by retention.
    pub published_retained: u64,
    /// Unpublished records that failed at least once, and the latest error.
    pub failing: u64,
    pub last_error: Option<String>,
    pub relays: Vec<RelayInfo>,
}

/// A relay process as the outbox tables know it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RelayInfo {
    pub relay: String,
    pub seen_at: DateTime<Utc>,
    /// Lanes it holds a live lease on.
    pub lanes: u64,
}

/// The outbox's tables in one database.
#[async_trait]
pub trait OutboxDb: Send + Sync {
    async fn publications(&self) -> Result<Vec<Publication>, OutboxError>;
    /// Stores a publication (validated) and makes sure the trigger exists.
    async fn add_publication(&self, publication: Publication) -> Result<Publication, OutboxError>;
    /// Removes a publication; the last one takes the trigger with it.
    /// Records already written stay and are still published.
    async fn remove_publication(&self, id: i64) -> Result<bool, OutboxError>;
    /// Renews `relay`'s presence and leases, takes free lanes up to its
    /// fair share of the live relays and gives back lanes beyond it.
    /// Returns the lanes it holds.
    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<Vec<i64>, OutboxError>;
    /// Gives back every lane of `relay` and forgets it (a clean stop).
    async fn leave(&self, relay: &str) -> Result<(), OutboxError>;
    /// The oldest unpublished records of `relay`'s lanes after position
    /// `after` (0: all), in position order.
    async fn pending(
        &self,
        relay: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, OutboxError>;
    /// Marks records published, only while `relay` still holds their lanes.
    /// Returns how many were marked.
    async fn mark_published(&self, relay: &str, positions: &[u64]) -> Result<u64, OutboxError>;
    /// Counts a failed attempt on records that stay pending.
    async fn record_failure(&self, positions: &[u64], error: &str) -> Result<(), OutboxError>;
    async fn status(&self) -> Result<OutboxStatus, OutboxError>;
    /// Deletes up to `limit` records published before `cutoff`.
    async fn purge(&self, cutoff: DateTime<Utc>, limit: usize) -> Result<u64, OutboxError>;
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn age_s(oldest: Option<DateTime<Utc>>) -> f64 {
    oldest.map_or(0.0, |at| {
        ((Utc::now() - at).num_microseconds().unwrap_or(0) as f64 / 1e6).max(0.0)
    })
}

/// How many lanes each of `live` relays should hold.
fn fair_share(live: i64) -> i64 {
    (LANES + live.max(1) - 1) / live.max(1)
}

fn templates(subject: Option<String>, key: Option<String>) -> Publication {
    Publication {
        id: 0,
        category: None,
        event_type: None,
        subject: subject.unwrap_or_else(|| DEFAULT_SUBJECT.to_owned()),
        key: key.unwrap_or_else(|| DEFAULT_KEY.to_owned()),
    }
}

fn message_of(event: StoredEvent<'_>, publication: &Publication) -> Result<Message, OutboxError> {
    let category = factline_core::category_of(event.stream_id);
    let subject = publication.subject_for(event.stream_id, category, event.event_type);
    let key = publication.key_for(event.stream_id, category, event.event_type);
    event
        .into_message(subject, key)
        .map_err(OutboxError::Database)
}

// ---------------------------------------------------------------- SQLite

/// The outbox in a SQLite store's file, on connections of its own: one
/// that reads records, one that writes marks and leases. A mark waiting
/// for the store's write lock never holds up the next fetch.
pub struct SqliteOutbox {
    reader: Arc<Mutex<Connection>>,
    writer: Arc<Mutex<Connection>>,
    path: PathBuf,
}

fn sqlite_connection(path: &Path) -> Result<Connection, OutboxError> {
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

const SQLITE_TABLES: &str = "
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
    CREATE TABLE IF NOT EXISTS outbox_relays (
        relay   TEXT    PRIMARY KEY,
        seen_at INTEGER NOT NULL
    );";

/// Runs inside the append's statement: the first matching publication
/// (lowest id) decides the record.
fn sqlite_trigger() -> String {
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

impl SqliteOutbox {
    /// Opens the outbox of the store at `path` (which must exist: the
    /// store creates its events table), creating its tables if needed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OutboxError> {
        let path = path.as_ref().to_path_buf();
        if !path.exists() {
            return Err(OutboxError::InvalidInput(format!(
                "{} does not exist: open the store there first",
                path.display()
            )));
        }
        let mut conn = sqlite_connection(&path)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let has_events: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events')",
            [],
            |r| r.get(0),
        )?;
        if !has_events {
            return Err(OutboxError::InvalidInput(format!(
                "{} holds no factline store",
                path.display()
            )));
        }
        tx.execute_batch(SQLITE_TABLES)?;
        tx.execute(
            &format!(
                "WITH RECURSIVE n(lane) AS (SELECT 0 UNION ALL SELECT lane + 1 FROM n WHERE lane < {})
                 INSERT OR IGNORE INTO outbox_lanes (lane) SELECT lane FROM n",
                LANES - 1
            ),
            [],
        )?;
        tx.commit()?;
        Ok(SqliteOutbox {
            reader: Arc::new(Mutex::new(sqlite_connection(&path)?)),
            writer: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the writing connection.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        Self::on(self.writer.clone(), work).await
    }

    /// Runs `work` on the reading connection.
    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        Self::on(self.reader.clone(), work).await
    }

    async fn on<T: Send + 'static>(
        conn: Arc<Mutex<Connection>>,
        work: impl FnOnce(&mut Connection) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| OutboxError::Database("the outbox connection was poisoned".into()))?;
            work(&mut conn)
        })
        .await
        .map_err(|e| OutboxError::Database(format!("an outbox task failed: {e}")))?
    }
}

fn sqlite_publications(conn: &Connection) -> rusqlite::Result<Vec<Publication>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, category, event_type, subject, key FROM outbox_publications ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Publication {
            id: r.get(0)?,
            category: r.get(1)?,
            event_type: r.get(2)?,
            subject: r.get(3)?,
            key: r.get(4)?,
        })
    })?;
    rows.collect()
}

#[async_trait]
impl OutboxDb for SqliteOutbox {
    async fn publications(&self) -> Result<Vec<Publication>, OutboxError> {
        self.read(|conn| Ok(sqlite_publications(conn)?)).await
    }

    async fn add_publication(&self, publication: Publication) -> Result<Publication, OutboxError> {
        publication.validate()?;
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO outbox_publications (category, event_type, subject, key, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    publication.category,
                    publication.event_type,
                    publication.subject,
                    publication.key,
                    micros(Utc::now())
                ],
            )?;
            let id = tx.last_insert_rowid();
            tx.execute_batch(&sqlite_trigger())?;
            tx.commit()?;
            Ok(Publication { id, ..publication })
        })
        .await
    }

    async fn remove_publication(&self, id: i64) -> Result<bool, OutboxError> {
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let removed = tx.execute("DELETE FROM outbox_publications WHERE id = ?1", [id])? > 0;
            let left: i64 =
                tx.query_row("SELECT count(*) FROM outbox_publications", [], |r| r.get(0))?;
            if left == 0 {
                tx.execute_batch("DROP TRIGGER IF EXISTS outbox_capture")?;
            }
            tx.commit()?;
            Ok(removed)
        })
        .await
    }

    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<Vec<i64>, OutboxError> {
        let relay = relay.to_owned();
        let ttl_us = ttl.as_micros() as i64;
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = micros(Utc::now());
            tx.execute(
                "INSERT INTO outbox_relays (relay, seen_at) VALUES (?1, ?2)
                 ON CONFLICT (relay) DO UPDATE SET seen_at = excluded.seen_at",
                params![relay, now],
            )?;
            tx.execute(
                "DELETE FROM outbox_relays WHERE seen_at < ?1",
                [now - 3 * ttl_us],
            )?;
            let live: i64 = tx.query_row(
                "SELECT count(*) FROM outbox_relays WHERE seen_at >= ?1",
                [now - ttl_us],
                |r| r.get(0),
            )?;
            let share = fair_share(live);
            tx.execute(
                "UPDATE outbox_lanes SET expires_at = ?2 WHERE holder = ?1 AND expires_at >= ?3",
                params![relay, now + ttl_us, now],
            )?;
            // A lease that ran out while this relay was away is not its own.
            tx.execute(
                "UPDATE outbox_lanes SET holder = NULL WHERE holder = ?1 AND expires_at < ?2",
                params![relay, now],
            )?;
            let held: i64 = tx.query_row(
                "SELECT count(*) FROM outbox_lanes WHERE holder = ?1",
                [&relay],
                |r| r.get(0),
            )?;
            if held > share {
                tx.execute(
                    "UPDATE outbox_lanes SET holder = NULL, expires_at = 0 WHERE lane IN
                         (SELECT lane FROM outbox_lanes WHERE holder = ?1 ORDER BY lane DESC LIMIT ?2)",
                    params![relay, held - share],
                )?;
            } else if held < share {
                tx.execute(
                    "UPDATE outbox_lanes SET holder = ?1, expires_at = ?2 WHERE lane IN
                         (SELECT lane FROM outbox_lanes WHERE holder IS NULL OR expires_at < ?3
                          ORDER BY lane LIMIT ?4)",
                    params![relay, now + ttl_us, now, share - held],
                )?;
            }
            let lanes = {
                let mut stmt =
                    tx.prepare("SELECT lane FROM outbox_lanes WHERE holder = ?1 ORDER BY lane")?;
                let lanes = stmt.query_map([&relay], |r| r.get(0))?;
                lanes.collect::<rusqlite::Result<Vec<i64>>>()?
            };
            tx.commit()?;
            Ok(lanes)
        })
        .await
    }

    async fn leave(&self, relay: &str) -> Result<(), OutboxError> {
        let relay = relay.to_owned();
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE outbox_lanes SET holder = NULL, expires_at = 0 WHERE holder = ?1",
                [&relay],
            )?;
            tx.execute("DELETE FROM outbox_relays WHERE relay = ?1", [&relay])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn pending(
        &self,
        relay: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, OutboxError> {
        let relay = relay.to_owned();
        self.read(move |conn| {
            let now = micros(Utc::now());
            let mut stmt = conn.prepare_cached(
                "SELECT o.position, s.stream_id, e.version, e.event_id, e.event_type, e.data,
                        e.metadata, e.recorded_at, p.subject, p.key
                 FROM outbox o
                 JOIN events e ON e.position = o.position
                 JOIN streams s ON s.stream_no = o.stream_no
                 LEFT JOIN outbox_publications p ON p.id = o.publication
                 WHERE o.published_at IS NULL AND o.position > ?4
                   AND o.lane IN (SELECT lane FROM outbox_lanes WHERE holder = ?1 AND expires_at >= ?2)
                 ORDER BY o.position LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![relay, now, limit as i64, after as i64])?;
            let mut messages = Vec::new();
            while let Some(row) = rows.next()? {
                let id: Vec<u8> = row.get(3)?;
                let event_id = Uuid::from_slice(&id).map_err(|e| {
                    OutboxError::Database(format!("a stored event id is not a UUID: {e}"))
                })?;
                let (stream_id, event_type, data): (String, String, String) =
                    (row.get(1)?, row.get(4)?, row.get(5)?);
                let metadata: Option<String> = row.get(6)?;
                let event = StoredEvent {
                    position: row.get::<_, i64>(0)? as u64,
                    stream_id: &stream_id,
                    version: row.get::<_, i64>(2)? as u64,
                    event_id,
                    event_type: &event_type,
                    data: &data,
                    metadata: metadata.as_deref(),
                    recorded_at: from_micros(row.get(7)?),
                };
                messages.push(message_of(event, &templates(row.get(8)?, row.get(9)?))?);
            }
            Ok(messages)
        })
        .await
    }

    async fn mark_published(&self, relay: &str, positions: &[u64]) -> Result<u64, OutboxError> {
        let relay = relay.to_owned();
        let positions =
            serde_json::to_string(positions).map_err(|e| OutboxError::Database(e.to_string()))?;
        self.run(move |conn| {
            // One statement for the whole wave, the positions as a JSON array.
            let marked = conn
                .prepare_cached(
                    "UPDATE outbox SET published_at = ?2
                     WHERE position IN (SELECT value FROM json_each(?1)) AND published_at IS NULL
                       AND lane IN (SELECT lane FROM outbox_lanes WHERE holder = ?3)",
                )?
                .execute(params![positions, micros(Utc::now()), relay])?;
            Ok(marked as u64)
        })
        .await
    }

    async fn record_failure(&self, positions: &[u64], error: &str) -> Result<(), OutboxError> {
        let (positions, error) = (positions.to_vec(), error.to_owned());
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut stmt = tx.prepare_cached(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = ?2 WHERE position = ?1",
                )?;
                for position in positions {
                    stmt.execute(params![position as i64, error])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn status(&self) -> Result<OutboxStatus, OutboxError> {
        self.read(|conn| {
            let publications = sqlite_publications(conn)?;
            let (backlog, oldest, failing): (i64, Option<i64>, i64) = conn.query_row(
                "SELECT count(*), min(created_at), count(*) FILTER (WHERE attempts > 0)
                 FROM outbox WHERE published_at IS NULL",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let published: i64 = conn.query_row(
                "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
                [],
                |r| r.get(0),
            )?;
            let last_error: Option<String> = conn
                .query_row(
                    "SELECT last_error FROM outbox WHERE published_at IS NULL AND last_error IS NOT NULL
                     ORDER BY position DESC LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let now = micros(Utc::now());
            let mut stmt = conn.prepare(
                "SELECT r.relay, r.seen_at,
                        (SELECT count(*) FROM outbox_lanes l WHERE l.holder = r.relay AND l.expires_at >= ?1)
                 FROM outbox_relays r ORDER BY r.relay",
            )?;
            let relays = stmt
                .query_map([now], |r| {
                    Ok(RelayInfo {
                        relay: r.get(0)?,
                        seen_at: from_micros(r.get(1)?),
                        lanes: r.get::<_, i64>(2)? as u64,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let oldest_pending_at = oldest.map(from_micros);
            Ok(OutboxStatus {
                publications,
                backlog: backlog as u64,
                oldest_pending_at,
                oldest_age_s: age_s(oldest_pending_at),
                published_retained: published as u64,
                failing: failing as u64,
                last_error,
                relays,
            })
        })
        .await
    }

    async fn purge(&self, cutoff: DateTime<Utc>, limit: usize) -> Result<u64, OutboxError> {
        self.run(move |conn| {
            let deleted = conn.execute(
                "DELETE FROM outbox WHERE position IN
                     (SELECT position FROM outbox WHERE published_at IS NOT NULL AND published_at < ?1
                      LIMIT ?2)",
                params![micros(cutoff), limit as i64],
            )?;
            Ok(deleted as u64)
        })
        .await
    }
}

// ------------------------------------------------------------ PostgreSQL

/// The outbox in a PostgreSQL store's schema, on a connection of its own.
pub struct PostgresOutbox {
    /// Marks, leases and configuration.
    client: tokio::sync::Mutex<tokio_postgres::Client>,
    /// Fetches, so a batch is fetched while the last one is being marked.
    reader: tokio::sync::Mutex<tokio_postgres::Client>,
    /// The relay's statements, prepared once per connection.
    lanes_sql: tokio::sync::OnceCell<tokio_postgres::Statement>,
    pending_sql: tokio::sync::OnceCell<tokio_postgres::Statement>,
    mark_sql: tokio::sync::OnceCell<tokio_postgres::Statement>,
    schema: String,
    connections: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for PostgresOutbox {
    fn drop(&mut self) {
        for connection in &self.connections {
            connection.abort();
        }
    }
}

async fn pg_connect(
    url: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), OutboxError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "the outbox's database connection ended");
        }
    });
    Ok((client, connection))
}

fn postgres_tables(s: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {s}.outbox_publications (
             id         bigserial   PRIMARY KEY,
             category   text,
             event_type text,
             subject    text        NOT NULL,
             key        text        NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now()
         );
         CREATE TABLE IF NOT EXISTS {s}.outbox (
             position     bigint      PRIMARY KEY,
             stream_no    bigint      NOT NULL,
             lane         integer     NOT NULL,
             publication  bigint      NOT NULL,
             created_at   timestamptz NOT NULL,
             published_at timestamptz,
             attempts     integer     NOT NULL DEFAULT 0,
             last_error   text
         );
         CREATE INDEX IF NOT EXISTS outbox_unpublished ON {s}.outbox (position) WHERE published_at IS NULL;
         CREATE INDEX IF NOT EXISTS outbox_published ON {s}.outbox (published_at) WHERE published_at IS NOT NULL;
         -- Published records leave the outbox for this log, one row per
         -- mark: deleting a record and appending one row per batch costs
         -- the database less than updating every record, and retention
         -- then deletes a few rows instead of many records.
         CREATE TABLE IF NOT EXISTS {s}.outbox_done (
             id           bigserial   PRIMARY KEY,
             positions    bigint[]    NOT NULL,
             published_at timestamptz NOT NULL
         );
         CREATE INDEX IF NOT EXISTS outbox_done_at ON {s}.outbox_done (published_at);
         -- Records marked by an earlier version, moved once.
         WITH moved AS (DELETE FROM {s}.outbox WHERE published_at IS NOT NULL
                        RETURNING position, published_at)
         INSERT INTO {s}.outbox_done (positions, published_at)
         SELECT array_agg(position ORDER BY position), date_trunc('second', published_at)
         FROM moved GROUP BY 2;
         CREATE TABLE IF NOT EXISTS {s}.outbox_lanes (
             lane       integer     PRIMARY KEY,
             holder     text,
             expires_at timestamptz NOT NULL DEFAULT 'epoch'
         );
         INSERT INTO {s}.outbox_lanes (lane) SELECT generate_series(0, {last}) ON CONFLICT DO NOTHING;
         CREATE TABLE IF NOT EXISTS {s}.outbox_relays (
             relay   text        PRIMARY KEY,
             seen_at timestamptz NOT NULL
         );
         -- One statement's new events, in one INSERT: appends write events
         -- in a few set-based statements, so the trigger runs per statement.
         CREATE OR REPLACE FUNCTION {s}.outbox_capture() RETURNS trigger LANGUAGE plpgsql AS $body$
         BEGIN
             INSERT INTO {s}.outbox (position, stream_no, lane, publication, created_at)
             SELECT n.position, n.stream_no, (n.stream_no % {LANES})::integer, p.id, n.recorded_at
             FROM new_events n
             CROSS JOIN LATERAL (
                 SELECT id FROM {s}.outbox_publications p
                 WHERE (p.category IS NULL OR p.category = n.category)
                   AND (p.event_type IS NULL OR p.event_type = n.event_type)
                 ORDER BY p.id LIMIT 1) p;
             RETURN NULL;
         END
         $body$;",
        last = LANES - 1
    )
}

pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PostgresOutbox {
    /// Connects to the outbox of the store in `schema` (which must exist:
    /// the store creates it), creating its tables if needed.
    pub async fn connect(url: &str, schema: &str) -> Result<Self, OutboxError> {
        let (mut client, connection) = pg_connect(url).await?;
        let s = quote_ident(schema);
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("factline-outbox-setup:{schema}")],
        )
        .await?;
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
        // Once set up, nothing is taken: the setup's DDL locks the outbox
        // tables, and against a running relay's marks that can deadlock.
        let set_up: bool = tx
            .query_one(
                "SELECT to_regclass(quote_ident($1) || '.outbox_done') IS NOT NULL",
                &[&schema],
            )
            .await?
            .get(0);
        if !set_up {
            tx.batch_execute(&postgres_tables(&s)).await?;
        }
        tx.commit().await?;
        // A mark lost in a crash republishes its records (which sinks
        // deduplicate), and a lost lease renewal only expires sooner: no
        // commit of this connection needs to wait for the disk.
        client.batch_execute("SET synchronous_commit = off").await?;
        let (reader, reader_connection) = pg_connect(url).await?;
        Ok(PostgresOutbox {
            client: tokio::sync::Mutex::new(client),
            reader: tokio::sync::Mutex::new(reader),
            lanes_sql: tokio::sync::OnceCell::new(),
            pending_sql: tokio::sync::OnceCell::new(),
            mark_sql: tokio::sync::OnceCell::new(),
            schema: s,
            connections: vec![connection, reader_connection],
        })
    }

    async fn publications_in(
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
async fn prepared<'a>(
    cell: &'a tokio::sync::OnceCell<tokio_postgres::Statement>,
    client: &tokio_postgres::Client,
    sql: impl FnOnce() -> String,
) -> Result<&'a tokio_postgres::Statement, tokio_postgres::Error> {
    cell.get_or_try_init(|| async { client.prepare(&sql()).await })
        .await
}

fn pg_positions(positions: &[u64]) -> Vec<i64> {
    positions.iter().map(|&p| p as i64).collect()
}

#[async_trait]
impl OutboxDb for PostgresOutbox {
    async fn publications(&self) -> Result<Vec<Publication>, OutboxError> {
        Self::publications_in(&*self.client.lock().await, &self.schema).await
    }

    async fn add_publication(&self, publication: Publication) -> Result<Publication, OutboxError> {
        publication.validate()?;
        let s = &self.schema;
        let mut client = self.client.lock().await;
        let tx = client.transaction().await?;
        // Configuration is durable when the call returns.
        tx.batch_execute("SET LOCAL synchronous_commit = on")
            .await?;
        let id: i64 = tx
            .query_one(
                &format!(
                    "INSERT INTO {s}.outbox_publications (category, event_type, subject, key)
                     VALUES ($1, $2, $3, $4) RETURNING id"
                ),
                &[
                    &publication.category,
                    &publication.event_type,
                    &publication.subject,
                    &publication.key,
                ],
            )
            .await?
            .get(0);
        tx.batch_execute(&format!(
            "DROP TRIGGER IF EXISTS outbox_capture ON {s}.events;
             CREATE TRIGGER outbox_capture AFTER INSERT ON {s}.events
                 REFERENCING NEW TABLE AS new_events
                 FOR EACH STATEMENT EXECUTE FUNCTION {s}.outbox_capture();"
        ))
        .await?;
        tx.commit().await?;
        Ok(Publication { id, ..publication })
    }

    async fn remove_publication(&self, id: i64) -> Result<bool, OutboxError> {
        let s = &self.schema;
        let mut client = self.client.lock().await;
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL synchronous_commit = on")
            .await?;
        let removed = tx
            .execute(
                &format!("DELETE FROM {s}.outbox_publications WHERE id = $1"),
                &[&id],
            )
            .await?
            > 0;
        let left: i64 = tx
            .query_one(
                &format!("SELECT count(*) FROM {s}.outbox_publications"),
                &[],
            )
            .await?
            .get(0);
        if left == 0 {
            tx.batch_execute(&format!(
                "DROP TRIGGER IF EXISTS outbox_capture ON {s}.events"
            ))
            .await?;
        }
        tx.commit().await?;
        Ok(removed)
    }

    async fn heartbeat(&self, relay: &str, ttl: Duration) -> Result<Vec<i64>, OutboxError> {
        let s = &self.schema;
        let ttl_s = ttl.as_secs_f64();
        let mut client = self.client.lock().await;
        let tx = client.transaction().await?;
        tx.execute(
            &format!(
                "INSERT INTO {s}.outbox_relays (relay, seen_at) VALUES ($1, now())
                 ON CONFLICT (relay) DO UPDATE SET seen_at = excluded.seen_at"
            ),
            &[&relay],
        )
        .await?;
        tx.execute(
            &format!(
                "DELETE FROM {s}.outbox_relays WHERE seen_at < now() - make_interval(secs => 3 * $1::float8)"
            ),
            &[&ttl_s],
        )
        .await?;
        let live: i64 = tx
            .query_one(
                &format!(
                    "SELECT count(*) FROM {s}.outbox_relays WHERE seen_at >= now() - make_interval(secs => $1::float8)"
                ),
                &[&ttl_s],
            )
            .await?
            .get(0);
        let share = fair_share(live);
        tx.execute(
            &format!(
                "UPDATE {s}.outbox_lanes SET holder = CASE WHEN expires_at >= now() THEN holder END,
                        expires_at = CASE WHEN expires_at >= now() THEN now() + make_interval(secs => $2::float8)
                                          ELSE expires_at END
                 WHERE holder = $1"
            ),
            &[&relay, &ttl_s],
        )
        .await?;
        let held: i64 = tx
            .query_one(
                &format!("SELECT count(*) FROM {s}.outbox_lanes WHERE holder = $1"),
                &[&relay],
            )
            .await?
            .get(0);
        if held > share {
            tx.execute(
                &format!(
                    "UPDATE {s}.outbox_lanes SET holder = NULL, expires_at = 'epoch' WHERE lane IN
                         (SELECT lane FROM {s}.outbox_lanes WHERE holder = $1 ORDER BY lane DESC LIMIT $2)"
                ),
                &[&relay, &(held - share)],
            )
            .await?;
        } else if held < share {
            // SKIP LOCKED and the second check: two relays taking lanes at
            // once never both get one.
            tx.execute(
                &format!(
                    "UPDATE {s}.outbox_lanes SET holder = $1, expires_at = now() + make_interval(secs => $2::float8)
                     WHERE lane IN (SELECT lane FROM {s}.outbox_lanes
                                    WHERE holder IS NULL OR expires_at < now()
                                    ORDER BY lane LIMIT $3 FOR UPDATE SKIP LOCKED)
                       AND (holder IS NULL OR expires_at < now())"
                ),
                &[&relay, &ttl_s, &(share - held)],
            )
            .await?;
        }
        let lanes = tx
            .query(
                &format!("SELECT lane FROM {s}.outbox_lanes WHERE holder = $1 ORDER BY lane"),
                &[&relay],
            )
            .await?
            .iter()
            .map(|r| i64::from(r.get::<_, i32>(0)))
            .collect();
        tx.commit().await?;
        Ok(lanes)
    }

    async fn leave(&self, relay: &str) -> Result<(), OutboxError> {
        let s = &self.schema;
        let mut client = self.client.lock().await;
        let tx = client.transaction().await?;
        tx.execute(
            &format!(
                "UPDATE {s}.outbox_lanes SET holder = NULL, expires_at = 'epoch' WHERE holder = $1"
            ),
            &[&relay],
        )
        .await?;
        tx.execute(
            &format!("DELETE FROM {s}.outbox_relays WHERE relay = $1"),
            &[&relay],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn pending(
        &self,
        relay: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, OutboxError> {
        let s = &self.schema;
        let client = self.reader.lock().await;
        // The lanes as a list, not a join: with `= ANY` the planner walks
        // the pending index in position order and stops at the limit.
        let lanes_sql = prepared(&self.lanes_sql, &client, || {
            format!(
                "SELECT coalesce(array_agg(lane), '{{}}') FROM {s}.outbox_lanes
                 WHERE holder = $1 AND expires_at >= now()"
            )
        })
        .await?;
        let lanes: Vec<i32> = client.query_one(lanes_sql, &[&relay]).await?.get(0);
        if lanes.is_empty() {
            return Ok(Vec::new());
        }
        // The records first, then their events: joining before the LIMIT
        // would read every pending record's event.
        let pending_sql = prepared(&self.pending_sql, &client, || {
                format!(
                    "WITH picked AS MATERIALIZED (
                         SELECT o.position, o.stream_no, o.publication FROM {s}.outbox o
                         WHERE o.published_at IS NULL AND o.position > $3 AND o.lane = ANY($1)
                         ORDER BY o.position LIMIT $2)
                     SELECT o.position, st.stream_id, e.version, e.event_id, e.event_type, e.data::text,
                            e.metadata::text, e.recorded_at, p.subject, p.key
                     FROM picked o
                     JOIN {s}.events e ON e.position = o.position
                     JOIN {s}.streams st ON st.stream_no = o.stream_no
                     LEFT JOIN {s}.outbox_publications p ON p.id = o.publication
                     ORDER BY o.position"
                )
            })
            .await?;
        let rows = client
            .query(pending_sql, &[&lanes, &(limit as i64), &(after as i64)])
            .await?;
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let (stream_id, event_type, data): (&str, &str, &str) =
                (row.get(1), row.get(4), row.get(5));
            let event = StoredEvent {
                position: row.get::<_, i64>(0) as u64,
                stream_id,
                version: row.get::<_, i64>(2) as u64,
                event_id: row.get(3),
                event_type,
                data,
                metadata: row.get(6),
                recorded_at: row.get(7),
            };
            messages.push(message_of(event, &templates(row.get(8), row.get(9)))?);
        }
        Ok(messages)
    }

    async fn mark_published(&self, relay: &str, positions: &[u64]) -> Result<u64, OutboxError> {
        let s = &self.schema;
        let client = self.client.lock().await;
        // The held lanes as an array, computed once: as a join the planner
        // may probe every position once per lane.
        let mark_sql = prepared(&self.mark_sql, &client, || {
            format!(
                "WITH done AS (
                     DELETE FROM {s}.outbox
                     WHERE position = ANY($1) AND published_at IS NULL
                       AND lane = ANY(ARRAY(SELECT lane FROM {s}.outbox_lanes WHERE holder = $2))
                     RETURNING position)
                 INSERT INTO {s}.outbox_done (positions, published_at)
                 SELECT array_agg(position ORDER BY position), now() FROM done
                 HAVING count(*) > 0
                 RETURNING cardinality(positions)::bigint"
            )
        })
        .await?;
        let logged = client
            .query_opt(mark_sql, &[&pg_positions(positions), &relay])
            .await?;
        Ok(logged.map_or(0, |row| row.get::<_, i64>(0) as u64))
    }

    async fn record_failure(&self, positions: &[u64], error: &str) -> Result<(), OutboxError> {
        let s = &self.schema;
        self.client
            .lock()
            .await
            .execute(
                &format!(
                    "UPDATE {s}.outbox SET attempts = attempts + 1, last_error = $2
                     WHERE position = ANY($1)"
                ),
                &[&pg_positions(positions), &error],
            )
            .await?;
        Ok(())
    }

    async fn status(&self) -> Result<OutboxStatus, OutboxError> {
        let s = &self.schema;
        let client = self.client.lock().await;
        let publications = Self::publications_in(&*client, s).await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), min(created_at), count(*) FILTER (WHERE attempts > 0),
                            (SELECT coalesce(sum(cardinality(positions)), 0)::bigint FROM {s}.outbox_done),
                            (SELECT last_error FROM {s}.outbox
                             WHERE published_at IS NULL AND last_error IS NOT NULL
                             ORDER BY position DESC LIMIT 1)
                     FROM {s}.outbox WHERE published_at IS NULL"
                ),
                &[],
            )
            .await?;
        let relays = client
            .query(
                &format!(
                    "SELECT r.relay, r.seen_at,
                            (SELECT count(*) FROM {s}.outbox_lanes l
                             WHERE l.holder = r.relay AND l.expires_at >= now())
                     FROM {s}.outbox_relays r ORDER BY r.relay"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| RelayInfo {
                relay: r.get(0),
                seen_at: r.get(1),
                lanes: r.get::<_, i64>(2) as u64,
            })
            .collect();
        let oldest_pending_at: Option<DateTime<Utc>> = row.get(1);
        Ok(OutboxStatus {
            publications,
            backlog: row.get::<_, i64>(0) as u64,
            oldest_pending_at,
            oldest_age_s: age_s(oldest_pending_at),
            published_retained: row.get::<_, i64>(3) as u64,
            failing: row.get::<_, i64>(2) as u64,
            last_error: row.get(4),
            relays,
        })
    }

    async fn purge(&self, cutoff: DateTime<Utc>, limit: usize) -> Result<u64, OutboxError> {
        let s = &self.schema;
        // The oldest rows, until they hold `limit` records (at least one
        // row, however many it holds).
        Ok(self
            .client
            .lock()
            .await
            .query_one(
                &format!(
                    "WITH gone AS (
                         DELETE FROM {s}.outbox_done WHERE id IN (
                             SELECT id FROM (
                                 SELECT id, sum(cardinality(positions)) OVER (ORDER BY id)
                                            - cardinality(positions) AS before
                                 FROM {s}.outbox_done WHERE published_at < $1
                                 ORDER BY id LIMIT $2) oldest
                             WHERE before < $2)
                         RETURNING cardinality(positions) AS records)
                     SELECT coalesce(sum(records), 0)::bigint FROM gone"
                ),
                &[&cutoff, &(limit as i64)],
            )
            .await?
            .get::<_, i64>(0) as u64)
    }
}
