//! The outbox and inbox on PostgreSQL.

pub mod inbox;
mod outbox;

pub use outbox::PostgresOutbox;

pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
