//! factline's command side (C1, C2, S6): an aggregate folds its events into
//! state and decides, from a command and that state, which events to emit or
//! which domain error to return; a [`CommandHandler`] loads it from any
//! [`EventStore`](factline_core::EventStore), decides, and appends with the
//! loaded version as the expected version, deciding again on a conflict.
//! [`testing`] runs decisions without a store (given/when/then).

#![warn(missing_docs)]

mod aggregate;
mod handler;
pub mod testing;

pub use aggregate::{tagged, Aggregate, DomainEvent};
pub use factline_core::tagged_events;
pub use factline_core::{DecodeError, UpcastError, Upcasters};
pub use handler::{
    AsOf, CommandContext, CommandError, CommandHandler, CommandOutcome, Failure, Loaded,
    DEFAULT_MAX_ATTEMPTS,
};
