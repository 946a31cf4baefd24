use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use factline_core::{
    AppendResult, Appended, CommandKey, CommandRecord, DecodeError, EventStore, ExpectedVersion,
    JsonText, Metadata, ReadStream, RecordedEvent, StoreError, StreamId,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{Aggregate, DomainEvent};

/// How many times a command is decided before a version conflict is final.
pub const DEFAULT_MAX_ATTEMPTS: usize = 3;

/// Who sent a command and in what business transaction. Every event the
/// command produces carries the correlation id (a fresh one when none was
/// given) and has the command id as its causation id (S6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandContext {
    /// The command's own id: the causation id of every event it produces.
    pub command_id: Uuid,
    /// The business transaction it belongs to; a fresh one when `None`.
    pub correlation_id: Option<String>,
    /// What caused the command itself (an event id, a request id).
    pub causation_id: Option<String>,
    /// The user or service that sent the command; stored as the `actor`
    /// header.
    pub actor: Option<String>,
    /// Further metadata headers copied onto every event.
    pub headers: BTreeMap<String, String>,
    /// With a key the command runs at most once (C3): a repeat with the
    /// same key gets the first execution's outcome and writes nothing.
    pub idempotency_key: Option<String>,
}

impl Default for CommandContext {
    fn default() -> Self {
        CommandContext {
            command_id: factline_core::new_event_id(),
            correlation_id: None,
            causation_id: None,
            actor: None,
            headers: BTreeMap::new(),
            idempotency_key: None,
        }
    }
}

impl CommandContext {
    /// A context with a fresh command id and nothing else.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the correlation id.
    pub fn correlated_with(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// Sets what caused the command.
    pub fn caused_by(mut self, causation_id: impl Into<String>) -> Self {
        self.causation_id = Some(causation_id.into());
        self
    }

    /// Sets the user or service that sent the command.
    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Adds a metadata header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Runs the command at most once per `key`.
    pub fn idempotent(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The metadata of the events this command produces. `correlation_id`
    /// is the one chosen for the whole command (retries included).
    fn event_metadata(&self, correlation_id: &str) -> Metadata {
        let mut headers = self.headers.clone();
        if let Some(actor) = &self.actor {
            headers.insert("actor".to_owned(), actor.clone());
        }
        if let Some(cause) = &self.causation_id {
            headers.insert("command_causation_id".to_owned(), cause.clone());
        }
        Metadata {
            correlation_id: Some(correlation_id.to_owned()),
            causation_id: Some(self.command_id.to_string()),
            headers,
            ..Metadata::default()
        }
    }
}

/// An aggregate's state as loaded, with the stream version it reflects.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded<A> {
    /// The state after applying every event up to `version`.
    pub state: A,
    /// 0 when the stream does not exist.
    pub version: u64,
    /// The version of the snapshot the load started from, if it used one.
    pub snapshot: Option<u64>,
    /// How many events were read and applied (after the snapshot).
    pub events_applied: u64,
}

/// What a handled command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandOutcome {
    /// The aggregate's stream.
    pub stream_id: StreamId,
    /// `None` when the decision emitted no events (nothing was appended).
    pub appended: Option<AppendResult>,
    /// The ids of the events the command produced, in order.
    pub event_ids: Vec<Uuid>,
    /// The correlation id the events carry.
    pub correlation_id: String,
    /// How many times the command was decided (1 without conflicts, 0 for
    /// a replay).
    pub attempts: usize,
    /// True when the idempotency key had already run: this is the first
    /// execution's outcome and nothing was written now.
    pub replayed: bool,
}

/// Why a command did not go through: the domain refused it, the caller
/// reused an idempotency key, or something failed. They are apart so
/// callers can answer "no" differently from "try again later".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate's rules refused the command; nothing was written.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// The idempotency key already ran a different command; nothing was
    /// written.
    #[error("idempotency key {key:?} was already used by a different command")]
    KeyReused {
        /// The idempotency key.
        key: String,
    },
    /// Not a business rule: the store, a conflict that outlasted the
    /// retries, or an event that cannot be encoded or decoded.
    #[error(transparent)]
    Failed(#[from] Failure),
}

/// Infrastructure and concurrency failures of command handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    #[error("stream {stream_id} kept changing: {attempts} attempts all hit version conflicts")]
    /// Every attempt found the stream changed since it was loaded.
    Conflict {
        /// The aggregate's stream.
        stream_id: StreamId,
        /// How many times the command was decided.
        attempts: usize,
    },
    #[error("event {version} of stream {stream_id} cannot be read: {source}")]
    /// A stored event does not decode as the aggregate's event type.
    Decode {
        /// The aggregate's stream.
        stream_id: StreamId,
        /// The version of the event.
        version: u64,
        /// Why it did not decode.
        #[source]
        source: DecodeError,
    },
    #[error("an event of stream {stream_id} cannot be encoded: {source}")]
    /// A decided event does not serialise.
    Encode {
        /// The aggregate's stream.
        stream_id: StreamId,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    /// The store failed.
    Store(#[from] StoreError),
}

/// A point in an aggregate's past (S10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsOf {
    /// After the stream's first `n` events.
    Version(u64),
    /// After every event of the stream at or below this global position.
    Position(u64),
    /// After every event of the stream recorded at or before this time.
    Time(DateTime<Utc>),
}

/// Snapshots every `every` events (C4), with the state's serde form.
struct SnapshotPolicy<A> {
    every: u64,
    encode: fn(&A) -> Result<JsonText, serde_json::Error>,
    decode: fn(Value) -> Result<A, serde_json::Error>,
}

impl<A> Clone for SnapshotPolicy<A> {
    fn clone(&self) -> Self {
        SnapshotPolicy { ..*self }
    }
}

/// Events read per page when loading.
const LOAD_PAGE: usize = 1024;

/// Loads aggregates of type `A` from a store and runs commands on them.
pub struct CommandHandler<A> {
    store: Arc<dyn EventStore>,
    max_attempts: usize,
    snapshots: Option<SnapshotPolicy<A>>,
}

impl<A> Clone for CommandHandler<A> {
    fn clone(&self) -> Self {
        CommandHandler {
            store: self.store.clone(),
            max_attempts: self.max_attempts,
            snapshots: self.snapshots.clone(),
        }
    }
}

impl<A: Aggregate + Serialize + DeserializeOwned> CommandHandler<A> {
    /// Snapshots the aggregate whenever a command takes it `every` or more
    /// events past the snapshot it was loaded from (or past the start), so
    /// a load reads at most about `every` events after the snapshot.
    pub fn with_snapshots(mut self, every: u64) -> Self {
        self.snapshots = Some(SnapshotPolicy {
            every: every.max(1),
            encode: |state| JsonText::encode(state),
            decode: serde_json::from_value,
        });
        self
    }
}

impl<A: Aggregate> CommandHandler<A> {
    /// A handler over `store`, retrying conflicts a few times and taking no snapshots.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        CommandHandler {
            store,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            snapshots: None,
        }
    }

    /// How many times a command is decided before a version conflict is
    /// returned (at least 1).
    pub fn with_max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The stream of the aggregate with this id.
    pub fn stream_id(id: &str) -> Result<StreamId, StoreError> {
        Ok(StreamId::new(format!("{}-{id}", A::CATEGORY))?)
    }

    /// The aggregate's current state: the latest usable snapshot (with a
    /// snapshot policy) and the events after it, folded in order.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, Failure> {
        let stream_id = Self::stream_id(id)?;
        self.load_stream(&stream_id, None).await
    }

    /// The aggregate as it was at a version, a global position or a time
    /// (S10). Never writes a snapshot.
    pub async fn load_as_of(&self, id: &str, as_of: AsOf) -> Result<Loaded<A>, Failure> {
        let stream_id = Self::stream_id(id)?;
        self.load_stream(&stream_id, Some(as_of)).await
    }

    async fn load_stream(
        &self,
        stream_id: &StreamId,
        as_of: Option<AsOf>,
    ) -> Result<Loaded<A>, Failure> {
        let mut loaded = Loaded {
            state: A::default(),
            version: 0,
            snapshot: None,
            events_applied: 0,
        };
        // A snapshot is a shortcut to a version; a past position or time
        // could lie before it, so those always start from the beginning.
        let usable_up_to = match as_of {
            None => Some(u64::MAX),
            Some(AsOf::Version(v)) => Some(v),
            Some(_) => None,
        };
        let mut replace_snapshot = false;
        if let (Some(policy), Some(limit)) = (&self.snapshots, usable_up_to) {
            match self.snapshot_state(policy, stream_id).await {
                Some(Ok((state, version))) if version <= limit => {
                    loaded.state = state;
                    loaded.version = version;
                    loaded.snapshot = Some(version);
                }
                Some(Ok(_)) => {}
                Some(Err(())) => replace_snapshot = as_of.is_none(),
                None => {}
            }
        }
        let stop = |event: &RecordedEvent| match as_of {
            None => false,
            Some(AsOf::Version(v)) => event.version > v,
            Some(AsOf::Position(p)) => event.position > p,
            Some(AsOf::Time(t)) => event.recorded_at > t,
        };
        'pages: loop {
            let page = self
                .store
                .read_stream(
                    stream_id,
                    ReadStream::forwards()
                        .from_version(loaded.version + 1)
                        .limit(LOAD_PAGE),
                )
                .await?;
            let full = page.len() == LOAD_PAGE;
            for recorded in &page {
                if stop(recorded) {
                    break 'pages;
                }
                let event =
                    A::Event::from_recorded(recorded).map_err(|source| Failure::Decode {
                        stream_id: stream_id.clone(),
                        version: recorded.version,
                        source,
                    })?;
                loaded.state.apply(&event);
                loaded.version = recorded.version;
                loaded.events_applied += 1;
            }
            if !full {
                break;
            }
        }
        if replace_snapshot && loaded.version > 0 {
            self.save_snapshot(stream_id, &loaded.state, loaded.version)
                .await;
        }
        Ok(loaded)
    }

    /// The stream's snapshot as state: `None` when there is none (or it
    /// cannot be fetched), `Err(())` when it is unusable (another snapshot
    /// version, or it does not decode) and should be replaced. Never fatal:
    /// the events are the truth, a snapshot only saves reading them.
    async fn snapshot_state(
        &self,
        policy: &SnapshotPolicy<A>,
        stream_id: &StreamId,
    ) -> Option<Result<(A, u64), ()>> {
        let snapshot = match self.store.load_snapshot(stream_id).await {
            Ok(snapshot) => snapshot?,
            Err(e) => {
                tracing::warn!(stream = %stream_id, error = %e, "loading the snapshot failed; reading all events");
                return None;
            }
        };
        if snapshot.snapshot_version != A::SNAPSHOT_VERSION {
            tracing::info!(
                stream = %stream_id,
                stored = snapshot.snapshot_version,
                current = A::SNAPSHOT_VERSION,
                "ignoring a snapshot of another snapshot version"
            );
            return Some(Err(()));
        }
        match (policy.decode)(snapshot.data) {
            Ok(state) => Some(Ok((state, snapshot.version))),
            Err(e) => {
                tracing::warn!(stream = %stream_id, version = snapshot.version, error = %e, "ignoring a snapshot that does not decode");
                Some(Err(()))
            }
        }
    }

    /// Saves a snapshot; a failure is logged, never returned (the command
    /// it follows has succeeded).
    async fn save_snapshot(&self, stream_id: &StreamId, state: &A, version: u64) {
        let Some(policy) = &self.snapshots else {
            return;
        };
        let saved = match (policy.encode)(state) {
            Ok(data) => self
                .store
                .save_snapshot(stream_id, version, A::SNAPSHOT_VERSION, &data)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("encoding the state: {e}")),
        };
        if let Err(error) = saved {
            tracing::warn!(stream = %stream_id, version, %error, "saving a snapshot failed");
        }
    }

    /// A digest of the command and the aggregate it is for: what tells a
    /// repeat from another command under the same idempotency key.
    fn fingerprint(stream_id: &StreamId, command: &A::Command) -> Result<String, Failure> {
        let payload = serde_json::to_vec(command).map_err(|source| Failure::Encode {
            stream_id: stream_id.clone(),
            source,
        })?;
        let mut digest = Sha256::new();
        digest.update(stream_id.as_str().as_bytes());
        digest.update([0]);
        digest.update(&payload);
        Ok(digest
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// The outcome a replayed key reports: the first execution's.
    async fn replay(&self, record: CommandRecord) -> Result<CommandOutcome, Failure> {
        // The correlation id is the one the first execution's events carry.
        let first = self
            .store
            .read_stream(
                &record.result.stream_id,
                ReadStream::forwards()
                    .from_version(record.result.first_version)
                    .limit(1),
            )
            .await?;
        let correlation_id = first
            .first()
            .and_then(|e| e.metadata.correlation_id.clone())
            .unwrap_or_default();
        Ok(CommandOutcome {
            stream_id: record.result.stream_id.clone(),
            appended: Some(record.result),
            event_ids: record.event_ids,
            correlation_id,
            attempts: 0,
            replayed: true,
        })
    }

    /// Loads the aggregate, decides, and appends the decision with the
    /// loaded version as the expected version. When another writer got
    /// there first it reloads and decides again, up to the configured
    /// number of attempts.
    ///
    /// With an idempotency key in the context, the key and the outcome are
    /// stored with the events; a repeat returns that outcome and writes
    /// nothing, even when both arrive at once. A command that decides no
    /// events stores no key (running it again decides again).
    pub async fn handle(
        &self,
        id: &str,
        command: &A::Command,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<A::Error>> {
        let stream_id = Self::stream_id(id).map_err(Failure::from)?;
        let command_key = match &context.idempotency_key {
            Some(key) => {
                let key = CommandKey::new(key.clone(), Self::fingerprint(&stream_id, command)?);
                key.validate().map_err(Failure::from)?;
                if let Some(record) = self
                    .store
                    .find_command(&key.key)
                    .await
                    .map_err(Failure::from)?
                {
                    if record.fingerprint != key.fingerprint {
                        return Err(CommandError::KeyReused { key: key.key });
                    }
                    return Ok(self.replay(record).await?);
                }
                Some(key)
            }
            None => None,
        };
        let correlation_id = context
            .correlation_id
            .clone()
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let metadata = context.event_metadata(&correlation_id);
        for attempt in 1..=self.max_attempts {
            let mut loaded = self.load_stream(&stream_id, None).await?;
            let decided = loaded
                .state
                .decide(command)
                .map_err(CommandError::Rejected)?;
            if decided.is_empty() {
                return Ok(CommandOutcome {
                    stream_id,
                    appended: None,
                    event_ids: Vec::new(),
                    correlation_id,
                    attempts: attempt,
                    replayed: false,
                });
            }
            let events = decided
                .iter()
                .map(|event| event.to_event_data(metadata.clone()))
                .collect::<Result<Vec<_>, serde_json::Error>>()
                .map_err(|source| Failure::Encode {
                    stream_id: stream_id.clone(),
                    source,
                })?;
            let event_ids = events.iter().map(|e| e.event_id).collect();
            let expected = ExpectedVersion::Exact(loaded.version);
            let appended = match &command_key {
                Some(key) => {
                    self.store
                        .append_command(&stream_id, expected, events, key)
                        .await
                }
                None => self
                    .store
                    .append(&stream_id, expected, events)
                    .await
                    .map(Appended::Written),
            };
            let result = match appended {
                Ok(Appended::Written(result)) => result,
                // Another sender of the same command got there first.
                Ok(Appended::Replayed(record)) => return Ok(self.replay(record).await?),
                Err(StoreError::Conflict { .. }) => continue,
                Err(StoreError::CommandKeyReused { key, .. }) => {
                    return Err(CommandError::KeyReused { key })
                }
                Err(e) => return Err(Failure::from(e).into()),
            };
            if let Some(policy) = &self.snapshots {
                let base = loaded.snapshot.unwrap_or(0);
                if result.last_version - base >= policy.every {
                    for event in &decided {
                        loaded.state.apply(event);
                    }
                    self.save_snapshot(&stream_id, &loaded.state, result.last_version)
                        .await;
                }
            }
            return Ok(CommandOutcome {
                stream_id,
                appended: Some(result),
                event_ids,
                correlation_id,
                attempts: attempt,
                replayed: false,
            });
        }
        Err(Failure::Conflict {
            stream_id,
            attempts: self.max_attempts,
        }
        .into())
    }
}
