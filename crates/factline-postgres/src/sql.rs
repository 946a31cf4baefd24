//! What every crate that talks to PostgreSQL shares: quoting identifiers,
//! describing a failure with the server's own words, and telling failures
//! that may pass from those that will not. The store, the read models and
//! the outbox use these, so they classify the same failure the same way.

use std::error::Error as _;

use factline_core::{StorageError, StoreError};
use tokio_postgres::error::SqlState;

/// `name` as a quoted SQL identifier (`"a""b"` for `a"b`).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The server's own message and SQLSTATE (`db error` alone says nothing),
/// or the client's description of a failure on the way.
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// Whether the same call may succeed later: a lost or refused connection,
/// a server shutting down or starting, a serialization failure or
/// deadlock, too many connections, a lock timeout.
pub fn is_transient(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    if let Some(code) = error.code() {
        let class = &code.code()[..2];
        return class == "08" // connection exception
            || class == "57" && *code != SqlState::QUERY_CANCELED // shutting down, cannot connect now
            || [
                SqlState::T_R_SERIALIZATION_FAILURE,
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::LOCK_NOT_AVAILABLE,
                SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
            ]
            .contains(code);
    }
    // Without a server error code it failed on the way: a socket error, a
    // refused connection or a connect timeout.
    let mut source = error.source();
    while let Some(e) = source {
        if e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    error.to_string().contains("timeout")
}

/// Whether the server aborted the transaction for reasons of its own (a
/// deadlock, a serialization failure): running the same transaction again
/// on the same connection may succeed.
pub fn is_aborted_by_server(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// A [`StorageError`] for a failed call, `context` saying what was being
/// done, retryable when [`is_transient`] says so, with the driver's error
/// as its source.
pub fn storage_error(context: &str, error: tokio_postgres::Error) -> StorageError {
    let retryable = is_transient(&error);
    let storage = StorageError::with_source(format!("{context}: {}", describe(&error)), error);
    if retryable {
        storage.retryable()
    } else {
        storage
    }
}

/// A storage error for a failed database call, marked retryable when the
/// same call may succeed later (lost connection, server restarting,
/// serialization failure, too many connections).
pub(crate) fn pg_error(context: &str, error: tokio_postgres::Error) -> StoreError {
    storage_error(context, error).into()
}

pub(crate) fn pool_error(context: &str, error: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError;
    match error {
        PoolError::Backend(e) => pg_error(context, e),
        // Waiting for a free connection or for a new one timed out: the
        // server is slow, overloaded or down, all of which may pass.
        other @ (PoolError::Timeout(_) | PoolError::Closed) => {
            StorageError::with_source(format!("{context}: {other}"), other)
                .retryable()
                .into()
        }
        other => StorageError::with_source(format!("{context}: {other}"), other).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_with_inner_quotes_doubled() {
        assert_eq!(quote_ident("read"), "\"read\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
