use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use factline_core::{
    AppendResult, EventData, EventStore, ExpectedVersion, Metadata, ReadStream, StoreError,
    StreamId,
};
use uuid::Uuid;

use crate::{Aggregate, DomainEvent};

/// How many times a command is decided before a version conflict is final.
pub const DEFAULT_MAX_ATTEMPTS: usize = 3;

/// Who sent a command and in what business transaction. Every event the
/// command produces carries the correlation id (a fresh one when none was
/// given) and has the command id as its causation id (S6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandContext {
    pub command_id: Uuid,
    pub correlation_id: Option<String>,
    /// What caused the command itself (an event id, a request id).
    pub causation_id: Option<String>,
    /// The user or service that sent the command; stored as the `actor`
    /// header.
    pub actor: Option<String>,
    pub headers: BTreeMap<String, String>,
}

impl Default for CommandContext {
    fn default() -> Self {
        CommandContext {
            command_id: factline_core::new_event_id(),
            correlation_id: None,
            causation_id: None,
            actor: None,
            headers: BTreeMap::new(),
        }
    }
}

impl CommandContext {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn correlated_with(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    pub fn caused_by(mut self, causation_id: impl Into<String>) -> Self {
        self.causation_id = Some(causation_id.into());
        self
    }

    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
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
    pub state: A,
    /// 0 when the stream does not exist.
    pub version: u64,
}

/// What a handled command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandOutcome {
    pub stream_id: StreamId,
    /// `None` when the decision emitted no events (nothing was appended).
    pub appended: Option<AppendResult>,
    pub event_ids: Vec<Uuid>,
    pub correlation_id: String,
    /// How many times the command was decided (1 without conflicts).
    pub attempts: usize,
}

/// Why a command did not go through: the domain refused it, or something
/// failed. The two are apart so callers can answer "no" differently from
/// "try again later".
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate's rules refused the command; nothing was written.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// Not a business rule: the store, a conflict that outlasted the
    /// retries, or an event that cannot be encoded or decoded.
    #[error(transparent)]
    Failed(#[from] Failure),
}

/// Infrastructure and concurrency failures of command handling.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("stream {stream_id} kept changing: {attempts} attempts all hit version conflicts")]
    Conflict {
        stream_id: StreamId,
        attempts: usize,
    },
    #[error("event {version} of stream {stream_id} cannot be decoded: {source}")]
    Decode {
        stream_id: StreamId,
        version: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("an event of stream {stream_id} cannot be encoded: {source}")]
    Encode {
        stream_id: StreamId,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Loads aggregates of type `A` from a store and runs commands on them.
pub struct CommandHandler<A> {
    store: Arc<dyn EventStore>,
    max_attempts: usize,
    aggregate: PhantomData<fn() -> A>,
}

impl<A> Clone for CommandHandler<A> {
    fn clone(&self) -> Self {
        CommandHandler {
            store: self.store.clone(),
            max_attempts: self.max_attempts,
            aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate> CommandHandler<A> {
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        CommandHandler {
            store,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            aggregate: PhantomData,
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

    /// The aggregate's current state: its events folded in order.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, Failure> {
        let stream_id = Self::stream_id(id)?;
        self.load_stream(&stream_id).await
    }

    async fn load_stream(&self, stream_id: &StreamId) -> Result<Loaded<A>, Failure> {
        let events = self
            .store
            .read_stream(stream_id, ReadStream::forwards())
            .await?;
        let mut loaded = Loaded {
            state: A::default(),
            version: 0,
        };
        for recorded in &events {
            let event =
                A::Event::decode(&recorded.event_type, &recorded.data).map_err(|source| {
                    Failure::Decode {
                        stream_id: stream_id.clone(),
                        version: recorded.version,
                        source,
                    }
                })?;
            loaded.state.apply(&event);
            loaded.version = recorded.version;
        }
        Ok(loaded)
    }

    /// Loads the aggregate, decides, and appends the decision with the
    /// loaded version as the expected version. When another writer got
    /// there first it reloads and decides again, up to the configured
    /// number of attempts.
    pub async fn handle(
        &self,
        id: &str,
        command: &A::Command,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<A::Error>> {
        let stream_id = Self::stream_id(id).map_err(Failure::from)?;
        let correlation_id = context
            .correlation_id
            .clone()
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let metadata = context.event_metadata(&correlation_id);
        for attempt in 1..=self.max_attempts {
            let loaded = self.load_stream(&stream_id).await?;
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
                });
            }
            let events = decided
                .iter()
                .map(|event| {
                    let (event_type, data) = event.encode()?;
                    Ok(EventData::new(event_type, data).with_metadata(metadata.clone()))
                })
                .collect::<Result<Vec<_>, serde_json::Error>>()
                .map_err(|source| Failure::Encode {
                    stream_id: stream_id.clone(),
                    source,
                })?;
            let event_ids = events.iter().map(|e| e.event_id).collect();
            let expected = ExpectedVersion::Exact(loaded.version);
            match self.store.append(&stream_id, expected, events).await {
                Ok(appended) => {
                    return Ok(CommandOutcome {
                        stream_id,
                        appended: Some(appended),
                        event_ids,
                        correlation_id,
                        attempts: attempt,
                    })
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(Failure::from(e).into()),
            }
        }
        Err(Failure::Conflict {
            stream_id,
            attempts: self.max_attempts,
        }
        .into())
    }
}
