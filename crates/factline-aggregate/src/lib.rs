//! factline's command side (C1, C2, S6): an aggregate folds its events into
//! state and decides, from a command and that state, which events to emit or
//! which domain error to return; a [`CommandHandler`] loads it from any
//! [`EventStore`](factline_core::EventStore), decides, and appends with the
//! loaded version as the expected version, deciding again on a conflict.
//! [`testing`] runs decisions without a store (given/when/then).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//!
//! use factline_aggregate::{tagged_events, Aggregate, CommandContext, CommandError, CommandHandler};
//! use factline_core::InMemoryStore;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default)]
//! struct Ticket {
//!     open: bool,
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! #[serde(tag = "type", content = "data")]
//! enum TicketEvent {
//!     TicketOpened { title: String },
//!     TicketClosed,
//! }
//! tagged_events!(TicketEvent);
//!
//! #[derive(Serialize)]
//! enum TicketCommand {
//!     Open { title: String },
//!     Close,
//! }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("the ticket is not open")]
//! struct NotOpen;
//!
//! impl Aggregate for Ticket {
//!     const CATEGORY: &'static str = "Ticket";
//!     type Event = TicketEvent;
//!     type Command = TicketCommand;
//!     type Error = NotOpen;
//!
//!     fn apply(&mut self, event: &TicketEvent) {
//!         self.open = matches!(event, TicketEvent::TicketOpened { .. });
//!     }
//!
//!     fn decide(&self, command: &TicketCommand) -> Result<Vec<TicketEvent>, NotOpen> {
//!         match command {
//!             TicketCommand::Open { title } => Ok(vec![TicketEvent::TicketOpened { title: title.clone() }]),
//!             TicketCommand::Close if self.open => Ok(vec![TicketEvent::TicketClosed]),
//!             TicketCommand::Close => Err(NotOpen),
//!         }
//!     }
//! }
//!
//! let tickets = CommandHandler::<Ticket>::new(Arc::new(InMemoryStore::new()));
//! let context = CommandContext::new();
//! tickets.handle("7", &TicketCommand::Open { title: "Printer".into() }, &context).await.unwrap();
//! tickets.handle("7", &TicketCommand::Close, &context).await.unwrap();
//! // A business rule refuses: nothing is written.
//! let again = tickets.handle("7", &TicketCommand::Close, &context).await;
//! assert!(matches!(again, Err(CommandError::Rejected(NotOpen))));
//! assert_eq!(tickets.load("7").await.unwrap().version, 2);
//! # });
//! ```

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
