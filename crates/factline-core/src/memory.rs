//! An in-memory [`EventStore`] for unit tests and examples. It follows the
//! same rules as the durable backends (it passes the conformance suite) but
//! keeps nothing across restarts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use crate::append::{
    resolve_duplicates, validate_append, EncodedEvent, ExistingEvent, Limits, StoredContent,
};
use crate::backend::{resolve_command, retention_cutoff};
use crate::Metadata;
use crate::{
    AppendResult, Appended, CommandKey, CommandRecord, Direction, EventData, EventStore,
    ExpectedVersion, JsonText, ReadStream, RecordedEvent, Snapshot, StorageError, StoreError,
    StreamFilter, StreamId, Subscription,
};

/// A store in the process's memory, for tests and examples: it keeps the same
/// contract as the durable backends (the conformance suite runs on it) and
/// forgets everything when dropped.
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
    commands: HashMap<String, CommandRecord>,
    last_purge: Option<DateTime<Utc>>,
    snapshots: HashMap<StreamId, Snapshot>,
}

impl Default for InMemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryStore {
    /// An empty store with the default [`Limits`].
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// An empty store with these limits.
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
            let metadata = (e.metadata != Metadata::default())
                .then(|| serde_json::to_string(&e.metadata).ok())
                .flatten();
            ExistingEvent {
                stream_id: e.stream_id.clone(),
                version: e.version,
                position: e.position,
                content: StoredContent {
                    event_type: e.event_type.clone(),
                    data: e.data.as_str().to_owned(),
                    metadata,
                },
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
        let encoded = validate_append(&events, &self.shared.limits)?;
        let mut state = self.state()?;
        let result = state.append(stream_id, expected, &encoded, events)?;
        drop(state);
        self.shared.head.send_replace(result.last_position);
        Ok(result)
    }

    async fn append_command(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        command: &CommandKey,
    ) -> Result<Appended, StoreError> {
        command.validate()?;
        let encoded = validate_append(&events, &self.shared.limits)?;
        let limits = &self.shared.limits;
        let now = Utc::now();
        let mut state = self.state()?;
        state.purge_if_due(now, limits);
        let stored = state.commands.get(&command.key);
        if let Some(record) = resolve_command(command, stored, now, limits.command_retention)? {
            return Ok(Appended::Replayed(record));
        }
        let event_ids = events.iter().map(|e| e.event_id).collect();
        let result = state.append(stream_id, expected, &encoded, events)?;
        state.commands.insert(
            command.key.clone(),
            CommandRecord {
                key: command.key.clone(),
                fingerprint: command.fingerprint.clone(),
                result: result.clone(),
                event_ids,
                recorded_at: now,
            },
        );
        drop(state);
        self.shared.head.send_replace(result.last_position);
        Ok(Appended::Written(result))
    }

    async fn find_command(&self, key: &str) -> Result<Option<CommandRecord>, StoreError> {
        let state = self.state()?;
        let retention = self.shared.limits.command_retention;
        Ok(state
            .commands
            .get(key)
            .filter(|r| r.is_live(Utc::now(), retention))
            .cloned())
    }

    async fn purge_commands(&self) -> Result<u64, StoreError> {
        let mut state = self.state()?;
        Ok(state.purge(Utc::now(), &self.shared.limits))
    }

    async fn save_snapshot(
        &self,
        stream_id: &StreamId,
        version: u64,
        snapshot_version: u32,
        data: &JsonText,
    ) -> Result<(), StoreError> {
        let mut state = self.state()?;
        let kept = state.snapshots.get(stream_id);
        if kept.is_some_and(|k| k.snapshot_version == snapshot_version && k.version > version) {
            return Ok(());
        }
        state.snapshots.insert(
            stream_id.clone(),
            Snapshot {
                stream_id: stream_id.clone(),
                version,
                snapshot_version,
                data: data.to_value().map_err(|e| {
                    StoreError::invalid_input(format!("the snapshot of {stream_id}: {e}"))
                })?,
                recorded_at: Utc::now(),
            },
        );
        Ok(())
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.state()?.snapshots.get(stream_id).cloned())
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

impl State {
    fn purge(&mut self, now: DateTime<Utc>, limits: &Limits) -> u64 {
        let cutoff = retention_cutoff(now, limits.command_retention);
        let before = self.commands.len();
        self.commands.retain(|_, r| r.recorded_at >= cutoff);
        self.last_purge = Some(now);
        (before - self.commands.len()) as u64
    }

    fn purge_if_due(&mut self, now: DateTime<Utc>, limits: &Limits) {
        let due = self.last_purge.is_none_or(|last| {
            now.signed_duration_since(last)
                .to_std()
                .is_ok_and(|since| since >= limits.command_purge_interval)
        });
        if due {
            self.purge(now, limits);
        }
    }

    fn append(
        &mut self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        encoded: &[EncodedEvent],
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        let state = self;
        let current = state.streams.get(stream_id).map_or(0, |s| s.len() as u64);
        let existing: Vec<_> = events.iter().map(|e| state.existing(&e.event_id)).collect();
        if let Some(original) =
            resolve_duplicates(stream_id, expected, current, encoded, &existing)?
        {
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
                data: event.data,
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
        Ok(AppendResult {
            stream_id: stream_id.clone(),
            first_version: current + 1,
            last_version: current + count,
            first_position,
            last_position: state.events.len() as u64,
        })
    }
}
