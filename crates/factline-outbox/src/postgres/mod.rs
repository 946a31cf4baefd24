//! The outbox and inbox on PostgreSQL.

mod connect;
pub mod inbox;
mod outbox;
mod schema;

pub use outbox::PostgresOutbox;

pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
