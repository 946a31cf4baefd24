//! The outbox and inbox on SQLite.

mod connect;
pub mod inbox;
mod outbox;
mod schema;

pub use outbox::SqliteOutbox;
