//! An in-memory [`EventStore`] for unit tests and examples. It follows the
//! same rules as the durable backends (it passes the conformance suite) but
//! keeps nothing across restarts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::watch;
use uuid::Uuid;

use crate::append::{resolve_duplicates, validate_append, ExistingEvent, Limits};
use crate::{
    AppendResult, Direction, EventData, EventStore, ExpectedVersion, ReadStream, RecordedEvent,
    StorageError, StoreError, StreamFilter, StreamId, Subscription,
};

#[derive(Clone)]
pub struct InMemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    head: watch::Sender<u64>,
    limits: Limits,
}

#[derive(Default)]
struct State {
    /// `events[i]` has global position `i + 1`.
    events: Vec<RecordedEvent>,
    /// Indexes into `events`, in version order.
    streams: HashMap<StreamId, Vec<usize>>,
    by_event_id: HashMap<Uuid, usize>,
}

impl Default for InMemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryStore {
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Self {
        InMemoryStore {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                head: watch::channel(0).0,
                limits,
            }),
        }
    }

    fn state(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.shared
            .state
            .lock()
            .map_err(|_| StorageError::new("in-memory store poisoned by a panic").into())
    }
}

impl State {
    fn existing(&self, id: &Uuid) -> Option<ExistingEvent> {
        self.by_event_id.get(id).map(|&i| {
            let e = &self.events[i];
            ExistingEvent {
                stream_id: e.stream_id.clone(),
                version: e.version,
                position: e.position,
            }
        })
    }
}

#[async_trait]
impl EventStore for InMemoryStore {
    async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        validate_append(&events, &self.shared.limits)?;
        let mut state = self.state()?;
        let current = state.streams.get(stream_id).map_or(0, |s| s.len() as u64);
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let existing: Vec<_> = ids.iter().map(|id| state.existing(id)).collect();
        if let Some(original) = resolve_duplicates(stream_id, expected, current, &ids, &existing)? {
            return Ok(original);
        }
        if !expected.is_satisfied_by(current) {
            return Err(StoreError::Conflict {
                stream_id: stream_id.clone(),
                expected,
                actual: current,
            });
        }
        let recorded_at = Utc::now();
        let first_position = state.events.len() as u64 + 1;
        let count = events.len() as u64;
        for (i, event) in events.into_iter().enumerate() {
            let index = state.events.len();
            state.events.push(RecordedEvent {
                stream_id: stream_id.clone(),
                version: current + 1 + i as u64,
                position: index as u64 + 1,
                event_id: event.event_id,
                event_type: event.event_type,
                data: event.data.to_value(),
                metadata: event.metadata,
                recorded_at,
            });
            state.by_event_id.insert(event.event_id, index);
            state
                .streams
                .entry(stream_id.clone())
                .or_default()
                .push(index);
        }
        let last_position = state.events.len() as u64;
        drop(state);
        self.shared.head.send_replace(last_position);
        Ok(AppendResult {
            stream_id: stream_id.clone(),
            first_version: current + 1,
            last_version: current + count,
            first_position,
            last_position,
        })
    }

    async fn read_stream(
        &self,
        stream_id: &StreamId,
        options: ReadStream,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let state = self.state()?;
        let Some(indexes) = state.streams.get(stream_id) else {
            return Ok(Vec::new());
        };
        let pick = |&i: &usize| state.events[i].clone();
        // Version v sits at indexes[v - 1].
        Ok(match options.direction {
            Direction::Forwards => {
                let skip = options.from_version.unwrap_or(1).saturating_sub(1) as usize;
                indexes
                    .iter()
                    .skip(skip)
                    .take(options.limit)
                    .map(pick)
                    .collect()
            }
            Direction::Backwards => {
                let end = options
                    .from_version
                    .map_or(indexes.len(), |v| (v as usize).min(indexes.len()));
                indexes[..end]
                    .iter()
                    .rev()
                    .take(options.limit)
                    .map(pick)
                    .collect()
            }
        })
    }

    async fn read_filtered(
        &self,
        filter: &StreamFilter,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let state = self.state()?;
        let start = from.max(1) as usize - 1;
        Ok(state
            .events
            .iter()
            .skip(start)
            .filter(|e| filter.matches(e))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        Ok(self.state()?.events.len() as u64)
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }

    fn subscribe(&self, filter: StreamFilter, from: u64) -> Subscription {
        Subscription::new(Arc::new(self.clone()), filter, from, None)
    }
}
