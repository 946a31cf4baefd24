//! The core of factline: the event model, the [`EventStore`] trait every
//! backend implements, subscriptions built on top of that trait, and an
//! in-memory store for unit tests.
//!
//! Conventions shared by every backend:
//! - stream versions are 1-based: a stream's first event has version 1 and a
//!   stream that does not exist has version 0;
//! - global positions start at 1 and strictly increase in commit order;
//! - every `from` argument is inclusive.

#![warn(missing_docs)]

mod append;
pub mod backend;
mod command;
mod domain;
mod error;
mod event;
mod files;
mod json;
pub mod memory;
mod store;
mod stream_id;
mod subscription;
mod version;

pub use append::Limits;
pub use command::{Appended, CommandKey, CommandRecord, Snapshot};
pub use domain::{tagged, DecodeError, DomainEvent, StepError, UpcastError, UpcastStep, Upcasters};
pub use error::{IdempotencyMismatch, InlineError, StorageError, StoreError};
pub use event::{new_event_id, EventData, Metadata, RecordedEvent};
pub use json::JsonText;
pub use memory::InMemoryStore;
pub use store::{Direction, EventStore, ReadBudget, ReadStream, StreamFilter, Tally, TallyRow};

pub use stream_id::{category_of, check_category, InvalidCategory, InvalidStreamId, StreamId};
pub use subscription::{Subscription, TypedError};
pub use version::{AppendResult, ExpectedVersion, ParseExpectedVersionError};

/// What the crate's macros refer to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use serde_json;
}
