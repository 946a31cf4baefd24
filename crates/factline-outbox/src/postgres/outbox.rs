//! The outbox in a PostgreSQL store's schema (see `db.rs` for the trigger
//! and the contract both backends keep).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::connect::*;
use crate::db::*;
use crate::message::StoredEvent;
use crate::{OutboxError, Publication, LANES};

/// The outbox in a PostgreSQL store's schema, on a connection of its own.
pub struct PostgresOutbox {
    /// Marks, leases and configuration.
    pub(super) client: tokio::sync::Mutex<tokio_postgres::Client>,
    /// Fetches, so a batch is fetched while the last one is being marked.
    pub(super) reader: tokio::sync::Mutex<tokio_postgres::Client>,
    /// The relay's statements, prepared once per connection.
    pub(super) lanes_sql: tokio::sync::OnceCell<tokio_postgres::Statement>,
    pub(super) pending_sql: tokio::sync::OnceCell<tokio_postgres::Statement>,
    pub(super) mark_sql: tokio::sync::OnceCell<tokio_postgres::Statement>,
    pub(super) streams_sql: tokio::sync::OnceCell<tokio_postgres::Statement>,
    /// Stream ids by number and publications by id, for the fetches: both
    /// never change once written, and joining them in cost the server
    /// more than the rest of the fetch.
    pub(super) stream_ids: Mutex<HashMap<i64, String>>,
    pub(super) templates: Mutex<HashMap<i64, Publication>>,
    pub(super) schema: String,
    pub(super) connections: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for PostgresOutbox {
    fn drop(&mut self) {
        for connection in &self.connections {
            connection.abort();
        }
    }
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
    ) -> Result<Vec<PendingRecord>, OutboxError> {
        let s = &self.schema;
        let client = self.reader.lock().await;
        let lanes_sql = prepared(&self.lanes_sql, &client, || {
            format!(
                "SELECT lane, upto FROM {s}.outbox_lanes WHERE holder = $1 AND expires_at >= now()"
            )
        })
        .await?;
        let held = client.query(lanes_sql, &[&relay]).await?;
        // Each lane's records start above its checkpoint; lanes not held
        // start nowhere.
        let mut bounds = vec![i64::MAX; LANES as usize];
        let mut lowest = i64::MAX;
        for row in &held {
            let (lane, upto): (i32, i64) = (row.get(0), row.get(1));
            let bound = upto.max(after as i64);
            if let Some(slot) = usize::try_from(lane).ok().and_then(|l| bounds.get_mut(l)) {
                *slot = bound;
                lowest = lowest.min(bound);
            }
        }
        if lowest == i64::MAX {
            return Ok(Vec::new());
        }
        // The records first, then their events: joining before the LIMIT
        // would read every pending record's event. When the records are
        // dense among the events (most events published), one scan of the
        // events' key over the records' span reads a few pages where a
        // lookup per record descends the index every time; sparse records
        // are looked up one by one. The rows come back unsorted: a sort
        // here costs the server as much as the rest of the fetch, and the
        // sort below is a linear check of rows that are almost always in order.
        let pending_sql = prepared(&self.pending_sql, &client, || {
            let columns = "o.position, o.stream_no, o.lane, o.publication, e.version, e.event_id,
                           e.event_type, e.data::text, e.metadata::text, e.recorded_at";
            format!(
                "WITH picked AS MATERIALIZED (
                     SELECT o.position, o.stream_no, o.lane, o.publication FROM {s}.outbox o
                     WHERE o.position > $2 AND o.position > ($1::bigint[])[o.lane + 1]
                     ORDER BY o.position LIMIT $3),
                 span AS MATERIALIZED (
                     SELECT min(position) AS low, max(position) AS high,
                            max(position) - min(position) < 4 * count(*) AS dense
                     FROM picked)
                 SELECT {columns} FROM picked o JOIN {s}.events e ON e.position = o.position
                 WHERE (SELECT dense FROM span)
                   AND e.position >= (SELECT low FROM span) AND e.position <= (SELECT high FROM span)
                 UNION ALL
                 SELECT {columns} FROM picked o JOIN {s}.events e ON e.position = o.position
                 WHERE NOT (SELECT dense FROM span)"
            )
        })
        .await?;
        let rows = client
            .query(pending_sql, &[&bounds, &lowest, &(limit as i64)])
            .await?;
        self.learn_streams(&client, &rows).await?;
        self.learn_templates(&client, &rows).await?;
        let stream_ids = lock(&self.stream_ids)?;
        let templates = lock(&self.templates)?;
        let fallback = Publication::everything();
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            let stream_no: i64 = row.get(1);
            let stream_id = stream_ids.get(&stream_no).ok_or_else(|| {
                OutboxError::internal(format!("the outbox names an unknown stream {stream_no}"))
            })?;
            let (event_type, data): (&str, &str) = (row.get(6), row.get(7));
            let event = StoredEvent {
                position: row.get::<_, i64>(0) as u64,
                stream_id,
                version: row.get::<_, i64>(4) as u64,
                event_id: row.get(5),
                event_type,
                data,
                metadata: row.get(8),
                recorded_at: row.get(9),
            };
            // A removed publication's records still go out, as the default
            // publication would send them.
            let publication = templates.get(&row.get::<_, i64>(3)).unwrap_or(&fallback);
            records.push(PendingRecord {
                lane: row.get::<_, i32>(2) as u32,
                message: message_of(event, publication)?,
            });
        }
        records.sort_by_key(|record| record.message.position);
        Ok(records)
    }

    async fn mark_published(&self, relay: &str, mark: &Mark) -> Result<u64, OutboxError> {
        let s = &self.schema;
        // Records at or below their lane's new checkpoint need no row of
        // their own: only their number, per lane, is kept here, and only
        // the others (behind a record that failed) go to the database.
        let mut covered = vec![0u64; LANES as usize];
        let (mut above, mut above_lanes): (Vec<i64>, Vec<i32>) = (Vec::new(), Vec::new());
        for (&position, &lane) in mark.positions.iter().zip(&mark.lanes) {
            match (mark.upto.get(lane as usize), covered.get_mut(lane as usize)) {
                (Some(&upto), Some(count)) if position <= upto => *count += 1,
                _ => {
                    above.push(position as i64);
                    above_lanes.push(lane as i32);
                }
            }
        }
        let client = self.client.lock().await;
        // The checkpoints of the lanes still leased move up (a lane whose
        // lease ran out mid-pump was left out of the later fetches, so the
        // relay's checkpoint may pass records it never saw); acknowledged
        // records above them leave the outbox for the log.
        let mark_sql = prepared(&self.mark_sql, &client, || {
            format!(
                "WITH held AS MATERIALIZED (
                     UPDATE {s}.outbox_lanes SET upto = greatest(upto, coalesce(($3::bigint[])[lane + 1], 0))
                     WHERE holder = $2 AND expires_at >= now()
                     RETURNING lane, upto),
                 acked AS MATERIALIZED (
                     SELECT a.position, a.position <= h.upto AS covered
                     FROM unnest($1::bigint[], $4::integer[]) a(position, lane)
                     JOIN held h ON h.lane = a.lane),
                 done AS (
                     DELETE FROM {s}.outbox
                     WHERE position = ANY(ARRAY(SELECT position FROM acked WHERE NOT covered))
                     RETURNING position),
                 logged AS (
                     INSERT INTO {s}.outbox_done (positions, published_at)
                     SELECT array_agg(position ORDER BY position), now() FROM done
                     HAVING count(*) > 0),
                 checkpointed AS (
                     INSERT INTO {s}.outbox_marks (lanes, uptos, published_at)
                     SELECT array_agg(lane ORDER BY lane), array_agg(upto ORDER BY lane), now() FROM held
                     HAVING count(*) > 0)
                 SELECT ARRAY(SELECT lane FROM held),
                        (SELECT count(*) FROM acked WHERE covered) + (SELECT count(*) FROM done)"
            )
        })
        .await?;
        let row = client
            .query_one(
                mark_sql,
                &[&above, &relay, &pg_positions(&mark.upto), &above_lanes],
            )
            .await?;
        let (held, marked_above): (Vec<i32>, i64) = (row.get(0), row.get(1));
        let marked_below: u64 = held
            .iter()
            .filter_map(|&lane| covered.get(usize::try_from(lane).ok()?))
            .sum();
        Ok(marked_below + marked_above as u64)
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
                    "WITH pending AS (
                         SELECT o.position, o.created_at, o.attempts, o.last_error
                         FROM {s}.outbox_lanes l
                         JOIN {s}.outbox o ON o.lane = l.lane AND o.position > l.upto)
                     SELECT count(*), min(created_at), count(*) FILTER (WHERE attempts > 0),
                            (SELECT coalesce(sum(cardinality(positions)), 0)::bigint FROM {s}.outbox_done)
                            + (SELECT count(*) FROM {s}.outbox_lanes l
                               JOIN {s}.outbox o ON o.lane = l.lane AND o.position <= l.upto),
                            (SELECT last_error FROM pending WHERE last_error IS NOT NULL
                             ORDER BY position DESC LIMIT 1)
                     FROM pending"
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
        let parked: i64 = client
            .query_one(&format!("SELECT count(*) FROM {s}.outbox_parked"), &[])
            .await?
            .get(0);
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
            parked: parked as u64,
        })
    }

    async fn park(&self, positions: &[u64], error: &str) -> Result<(), OutboxError> {
        let s = &self.schema;
        self.client
            .lock()
            .await
            .execute(
                &format!(
                    "INSERT INTO {s}.outbox_parked (position, error)
                     SELECT unnest($1::bigint[]), $2
                     ON CONFLICT (position) DO UPDATE SET error = excluded.error, parked_at = now()"
                ),
                &[&pg_positions(positions), &error],
            )
            .await?;
        Ok(())
    }

    async fn parked(&self, limit: usize) -> Result<Vec<ParkedRecord>, OutboxError> {
        let s = &self.schema;
        let rows = self
            .client
            .lock()
            .await
            .query(
                &format!(
                    "SELECT p.position, st.stream_id, e.event_type, p.error, p.parked_at
                     FROM {s}.outbox_parked p
                     JOIN {s}.events e ON e.position = p.position
                     JOIN {s}.streams st ON st.stream_no = e.stream_no
                     ORDER BY p.position DESC LIMIT $1"
                ),
                &[&(limit.min(i64::MAX as usize) as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ParkedRecord {
                position: r.get::<_, i64>(0) as u64,
                stream_id: r.get(1),
                event_type: r.get(2),
                error: r.get(3),
                parked_at: r.get(4),
            })
            .collect())
    }

    async fn purge(&self, cutoff: DateTime<Utc>, limit: usize) -> Result<u64, OutboxError> {
        let s = &self.schema;
        let client = self.client.lock().await;
        // Records under a checkpoint that marks older than the cutoff had
        // reached, lane by lane, with no order to sort: a batch stops at
        // its limit.
        let under_checkpoints: i64 = client
            .query_one(
                &format!(
                    "WITH horizon AS MATERIALIZED (
                         SELECT m.lane, max(m.upto) AS upto
                         FROM {s}.outbox_marks, unnest(lanes, uptos) m(lane, upto)
                         WHERE published_at < $1 GROUP BY m.lane),
                     gone AS (
                         DELETE FROM {s}.outbox WHERE position = ANY(ARRAY(
                             SELECT o.position FROM horizon h
                             JOIN {s}.outbox o ON o.lane = h.lane AND o.position <= h.upto
                             LIMIT $2))
                         RETURNING 1)
                     SELECT count(*) FROM gone"
                ),
                &[&cutoff, &(limit as i64)],
            )
            .await?
            .get(0);
        let mut purged = under_checkpoints as u64;
        if purged >= limit as u64 {
            return Ok(purged);
        }
        // Nothing is left under those marks: they are done with.
        client
            .execute(
                &format!("DELETE FROM {s}.outbox_marks WHERE published_at < $1"),
                &[&cutoff],
            )
            .await?;
        // Then the log of records published one by one: the oldest rows,
        // until they hold the rest of the batch (at least one row,
        // however many it holds).
        let left = limit as i64 - purged as i64;
        purged += client
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
                &[&cutoff, &left],
            )
            .await?
            .get::<_, i64>(0) as u64;
        Ok(purged)
    }
}
