//! Poison events (P8): an event that still fails after its retries is, by
//! the projection's policy, either the end of the run or parked in a
//! dead-letter table with its error — and then every later event of its
//! stream is parked behind it, so per-stream order is never broken.
//! Parked events can be listed, retried (in position order, per stream) and
//! skipped.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use factline_core::{EventStore, RecordedEvent};

use crate::ProjectionError;

/// What the runner does with an event that keeps failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PoisonPolicy {
    /// The projection stops and reports why.
    #[default]
    Stop,
    /// The event is parked and the projection goes on.
    Park,
}

/// How often, and how patiently, a failing event is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first one included.
    pub attempts: u32,
    /// The wait before the second try.
    pub first_backoff: Duration,
    /// The longest wait between tries; each wait doubles up to it.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// An event in the dead-letter table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ParkedEvent {
    /// The event's global position.
    pub position: u64,
    /// The event's stream.
    pub stream_id: String,
    /// The event's id.
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// Why it was parked: the projection's last refusal.
    pub error: String,
    /// How often it was tried (0 for an event held back behind another).
    pub attempts: u32,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

/// What a retry of the parked events did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetryReport {
    /// Parked events applied by the retry.
    pub applied: u64,
    /// Parked events still refused.
    pub still_parked: u64,
}

/// Managing a projection's parked events (library API; the CLI uses it).
#[async_trait]
pub trait Parking {
    /// The parked events, in position order.
    async fn parked(&mut self) -> Result<Vec<ParkedEvent>, ProjectionError>;

    /// Gives up on the parked event at `position` (it is counted as
    /// skipped). Events held back behind it stay parked until retried.
    async fn skip(&mut self, position: u64) -> Result<bool, ProjectionError>;

    /// Applies the parked events again, each in its own transaction, in
    /// position order; a stream stops at its first event that still fails.
    async fn retry(&mut self, store: &dyn EventStore) -> Result<RetryReport, ProjectionError>;
}

/// What a batch does with its events.
#[derive(Clone)]
pub(crate) enum Handling {
    Apply,
    /// Park them all (the runner gave up on them).
    Park {
        error: String,
        attempts: u32,
    },
}

/// The recorded events of `parked`, from the store.
pub(crate) async fn fetch(
    store: &dyn EventStore,
    parked: &[ParkedEvent],
) -> Result<Vec<RecordedEvent>, ProjectionError> {
    let mut events = Vec::with_capacity(parked.len());
    for p in parked {
        if let Some(event) = store.read_all(p.position, 1).await?.into_iter().next() {
            if event.position == p.position {
                events.push(event);
            }
        }
    }
    Ok(events)
}
