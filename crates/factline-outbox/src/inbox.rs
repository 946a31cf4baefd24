//! The consumer side (O5): record each processed event id in the
//! consumer's own transaction, so a redelivered message is acknowledged
//! and ignored, and the consumer's state changes exactly once.
//!
//! ```text
//! let tx = conn.transaction()?;
//! if inbox::sqlite::first_delivery(&tx, "billing", event_id)? {
//!     apply(&tx, &event)?;          // the consumer's own writes
//! }
//! tx.commit()?;                     // then acknowledge the message
//! ```

/// On SQLite, in the consumer's database.
#[cfg(feature = "sqlite")]
pub use crate::sqlite::inbox as sqlite;

/// On PostgreSQL, in the consumer's database.
#[cfg(feature = "postgres")]
pub use crate::postgres::inbox as postgres;
