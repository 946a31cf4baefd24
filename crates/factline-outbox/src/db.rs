//! The outbox's tables, on SQLite and PostgreSQL: publications, records,
//! lanes and relays.
//!
//! Records are written by a trigger on the store's events table, created
//! with the first publication and dropped with the last, so appends pay
//! nothing while nothing is published. The trigger runs inside the
//! append's statement, hence its transaction: rollbacks take the record
//! with them, and every process that appends writes records, configured
//! or not.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::message::StoredEvent;
use crate::{Message, OutboxError, Publication, LANES};

/// What `factline outbox status` and the admin API show.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutboxStatus {
    /// Which events leave, and where to.
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
    /// The latest failure of a failing record.
    pub last_error: Option<String>,
    /// The relays that reported recently, with the lanes they hold.
    pub relays: Vec<RelayInfo>,
    /// Records a sink refused for good, kept with why (see
    /// [`OutboxDb::parked`]).
    pub parked: u64,
}

/// A record a sink refused for good ([`SinkError::permanent`](crate::SinkError::permanent)):
/// kept with the refusal instead of being retried forever, while the rest
/// of its stream goes on.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParkedRecord {
    /// The event's global position.
    pub position: u64,
    /// The event's stream.
    pub stream_id: String,
    /// The event's type.
    pub event_type: String,
    /// What the sink said.
    pub error: String,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// A relay process as the outbox tables know it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RelayInfo {
    pub relay: String,
    pub seen_at: DateTime<Utc>,
    /// Lanes it holds a live lease on.
    pub lanes: u64,
}

/// A pending record as a relay fetches it: its lane and its message.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingRecord {
    /// The lane the record is in.
    pub lane: u32,
    /// The message to publish.
    pub message: Message,
}

/// What a relay marks at once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mark {
    /// Acknowledged records, and the lane of each.
    pub positions: Vec<u64>,
    /// The lane of each acknowledged record, in the same order.
    pub lanes: Vec<u32>,
    /// Per lane (indexed by lane): every record of the lane at or below
    /// this position has been acknowledged (0: nothing is known). A
    /// database may keep such a checkpoint instead of marking each record.
    pub upto: Vec<u64>,
}

/// The outbox's tables in one database.
#[async_trait]
pub trait OutboxDb: Send + Sync {
    /// The publications, in id order.
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
    /// `after` (0: all), in position order: every pending record of those
    /// lanes between `after` and the last one returned.
    async fn pending(
        &self,
        relay: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<PendingRecord>, OutboxError>;
    /// Marks records published, only while `relay` still holds their lanes.
    /// Returns how many were marked.
    async fn mark_published(&self, relay: &str, mark: &Mark) -> Result<u64, OutboxError>;
    /// Counts a failed attempt on records that stay pending.
    async fn record_failure(&self, positions: &[u64], error: &str) -> Result<(), OutboxError>;
    /// The backlog, failures and relays, for operators.
    async fn status(&self) -> Result<OutboxStatus, OutboxError>;
    /// Keeps records a sink refused for good, with why; the relay then
    /// marks them done. Parking one again replaces its error.
    async fn park(&self, positions: &[u64], error: &str) -> Result<(), OutboxError>;
    /// The parked records, newest first, at most `limit`.
    async fn parked(&self, limit: usize) -> Result<Vec<ParkedRecord>, OutboxError>;
    /// Deletes up to `limit` records published before `cutoff`.
    async fn purge(&self, cutoff: DateTime<Utc>, limit: usize) -> Result<u64, OutboxError>;
}

pub(crate) fn age_s(oldest: Option<DateTime<Utc>>) -> f64 {
    oldest.map_or(0.0, |at| {
        ((Utc::now() - at).num_microseconds().unwrap_or(0) as f64 / 1e6).max(0.0)
    })
}

/// How many lanes each of `live` relays should hold.
pub(crate) fn fair_share(live: i64) -> i64 {
    (LANES + live.max(1) - 1) / live.max(1)
}

pub(crate) fn message_of(
    event: StoredEvent<'_>,
    publication: &Publication,
) -> Result<Message, OutboxError> {
    let category = factline_core::category_of(event.stream_id);
    let subject = publication.subject_for(event.stream_id, category, event.event_type);
    let key = publication.key_for(event.stream_id, category, event.event_type);
    event
        .into_message(subject, key)
        .map_err(OutboxError::internal)
}
