//! The outbox and inbox on SQLite.

pub mod inbox;
mod outbox;

pub use outbox::SqliteOutbox;
