//! The outbox in a SQLite store's file (see `db.rs` for the trigger and the
//! contract both backends keep).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::connect::*;
use super::schema::*;
use crate::db::*;
use crate::message::StoredEvent;
use crate::{OutboxError, Publication, DEFAULT_KEY, DEFAULT_SUBJECT};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// The outbox in a SQLite store's file, on connections of its own: one
/// that reads records, one that writes marks and leases. A mark waiting
/// for the store's write lock never holds up the next fetch.
pub struct SqliteOutbox {
    pub(super) reader: Arc<Mutex<Connection>>,
    pub(super) writer: Arc<Mutex<Connection>>,
    pub(super) path: PathBuf,
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
    ) -> Result<Vec<PendingRecord>, OutboxError> {
        let relay = relay.to_owned();
        self.read(move |conn| {
            let now = micros(Utc::now());
            let mut stmt = conn.prepare_cached(
                "SELECT o.position, s.stream_id, e.version, e.event_id, e.event_type, e.data,
                        e.metadata, e.recorded_at, p.subject, p.key, o.lane
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
                    OutboxError::internal(format!("a stored event id is not a UUID: {e}"))
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
                messages.push(PendingRecord {
                    lane: row.get(10)?,
                    message: message_of(event, &templates(row.get(8)?, row.get(9)?))?,
                });
            }
            Ok(messages)
        })
        .await
    }

    async fn mark_published(&self, relay: &str, mark: &Mark) -> Result<u64, OutboxError> {
        // SQLite marks each record in place; the checkpoints are for
        // PostgreSQL, whose server pays for every record a mark touches.
        let relay = relay.to_owned();
        let positions = serde_json::to_string(&mark.positions)
            .map_err(|e| OutboxError::internal(e.to_string()))?;
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
            let parked: i64 = conn.query_row("SELECT count(*) FROM outbox_parked", [], |r| r.get(0))?;
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
                parked: parked as u64,
            })
        })
        .await
    }

    async fn park(&self, positions: &[u64], error: &str) -> Result<(), OutboxError> {
        let (positions, error) = (positions.to_vec(), error.to_owned());
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO outbox_parked (position, error, parked_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (position) DO UPDATE SET error = excluded.error, parked_at = excluded.parked_at",
                )?;
                let now = micros(Utc::now());
                for position in positions {
                    stmt.execute(params![position as i64, error, now])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn parked(&self, limit: usize) -> Result<Vec<ParkedRecord>, OutboxError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT p.position, s.stream_id, e.event_type, p.error, p.parked_at
                 FROM outbox_parked p
                 JOIN events e ON e.position = p.position
                 JOIN streams s ON s.stream_no = e.stream_no
                 ORDER BY p.position DESC LIMIT ?1",
            )?;
            let rows = stmt
                .query_map([limit.min(i64::MAX as usize) as i64], |r| {
                    Ok(ParkedRecord {
                        position: r.get::<_, i64>(0)? as u64,
                        stream_id: r.get(1)?,
                        event_type: r.get(2)?,
                        error: r.get(3)?,
                        parked_at: from_micros(r.get(4)?),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
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

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
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
