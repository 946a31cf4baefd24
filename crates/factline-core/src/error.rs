use std::fmt;

use uuid::Uuid;

use crate::{ExpectedVersion, InvalidStreamId, StreamId};

/// Everything a store operation can fail with.
///
/// All variants but [`StoreError::Storage`] are rejections of the request
/// itself: retrying the same request gives the same answer. `Storage` is an
/// infrastructure failure, see [`StorageError::is_retryable`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("version conflict on stream {stream_id}: expected {expected}, actual {actual}")]
    /// The stream is not at the version the append expected.
    Conflict {
        /// The stream appended to.
        stream_id: StreamId,
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's current version; 0 when it does not exist.
        actual: u64,
    },
    #[error("idempotency mismatch on stream {stream_id}: {reason}")]
    /// A retried append does not match what is stored under its event ids.
    IdempotencyMismatch {
        /// The stream appended to.
        stream_id: StreamId,
        /// How the retry differs.
        reason: IdempotencyMismatch,
    },
    /// The idempotency key is stored for a different command.
    #[error(
        "idempotency key {key:?} was already used by a different command (on stream {stream_id})"
    )]
    CommandKeyReused {
        /// The command's idempotency key.
        key: String,
        /// The stream the key's command wrote to.
        stream_id: StreamId,
    },
    #[error("event {event_id} is {size} bytes, over the limit of {max} bytes")]
    /// An event is over [`crate::Limits::max_event_bytes`].
    TooLarge {
        /// The event's id.
        event_id: Uuid,
        /// Its size: type, data and metadata, in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },
    #[error(transparent)]
    /// The stream id is not valid.
    InvalidStreamId(#[from] InvalidStreamId),
    #[error("invalid input: {0}")]
    /// The request is malformed: what is wrong with it.
    InvalidInput(String),
    /// A projection updated in the append's own transaction (an inline
    /// projection, C6) refused the append's events; nothing was written.
    #[error("inline projection {projection} refused the append: {message}")]
    InlineRefused {
        /// The inline projection's name.
        projection: String,
        /// What it said.
        message: String,
    },
    #[error(transparent)]
    /// The database failed; see [`StorageError::is_retryable`].
    Storage(#[from] StorageError),
}

impl StoreError {
    /// True for rejections of the request (as opposed to infrastructure failures).
    pub fn is_rejection(&self) -> bool {
        !matches!(self, StoreError::Storage(_))
    }

    /// A rejection of the request with this explanation.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        StoreError::InvalidInput(message.into())
    }
}

/// Why a retried append does not match what is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencyMismatch {
    /// Some of the append's event ids are stored, some are not.
    PartialOverlap {
        /// How many of the ids are stored.
        stored: usize,
        /// How many events the append holds.
        total: usize,
    },
    /// An event id is already used by an event of another stream.
    OtherStream {
        /// The event id used twice.
        event_id: Uuid,
        /// The stream that holds it.
        stream_id: StreamId,
    },
    /// All ids are stored in this stream, but not as one run in this order.
    DifferentOrder,
    /// The id is stored with another type, data or metadata: a retry must
    /// repeat the event, not change it.
    DifferentContent {
        /// The event id whose content differs.
        event_id: Uuid,
    },
}

impl fmt::Display for IdempotencyMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdempotencyMismatch::PartialOverlap { stored, total } => write!(
                f,
                "{stored} of the {total} event ids are already stored; a retry must repeat exactly the original events"
            ),
            IdempotencyMismatch::OtherStream { event_id, stream_id } => {
                write!(f, "event id {event_id} is already used in stream {stream_id}")
            }
            IdempotencyMismatch::DifferentOrder => f.write_str(
                "the event ids are stored, but not consecutively in this order",
            ),
            IdempotencyMismatch::DifferentContent { event_id } => write!(
                f,
                "event id {event_id} is stored with another type, data or metadata; a retry must repeat the event exactly"
            ),
        }
    }
}

/// An infrastructure failure: disk, database, network, corrupt data.
#[derive(Debug, thiserror::Error)]
#[error("storage failure: {message}")]
pub struct StorageError {
    message: String,
    retryable: bool,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StorageError {
    /// A failure that retrying will not cure.
    pub fn new(message: impl Into<String>) -> Self {
        StorageError {
            message: message.into(),
            retryable: false,
            source: None,
        }
    }

    /// A failure caused by `source`; `retryable` says whether the same request may succeed later.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StorageError {
            message: message.into(),
            retryable: false,
            source: Some(Box::new(source)),
        }
    }

    /// Marks the failure as transient: the same request may succeed later.
    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    /// Whether the same request may succeed later (a lost connection, a
    /// restarting server, a busy database).
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// What failed, in words.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Why an inline projection did not apply an append's events. The inline
/// projection traits of both backends return it, so a refusal and a
/// failure are told apart the same way everywhere.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InlineError {
    /// The projection refused the event at `position` (one of its rules, or
    /// a constraint of its tables): the append fails with
    /// [`StoreError::InlineRefused`] and nothing of it is written.
    #[error("the event at position {position}: {message}")]
    Refused {
        /// The refused event's global position.
        position: u64,
        /// Why, in the projection's words.
        message: String,
    },
    /// The database failed: the append fails with this storage error,
    /// retryable when it is.
    #[error(transparent)]
    Failed(#[from] StorageError),
}

impl InlineError {
    /// The projection refuses the event at `position`.
    pub fn refused(position: u64, message: impl Into<String>) -> Self {
        InlineError::Refused {
            position,
            message: message.into(),
        }
    }
}
