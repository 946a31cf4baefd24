//! Mapping PostgreSQL failures onto [`StoreError`].

use std::error::Error as _;

use factline_core::{StorageError, StoreError};
use tokio_postgres::error::SqlState;

/// A storage error for a failed database call, marked retryable when the
/// same call may succeed later (lost connection, server restarting,
/// serialization failure, too many connections).
pub(crate) fn pg_error(context: &str, error: tokio_postgres::Error) -> StoreError {
    let retryable = is_transient(&error);
    let message = match error.as_db_error() {
        Some(db) => format!("{context}: {} ({})", db.message(), db.code().code()),
        None => format!("{context}: {error}"),
    };
    let storage = StorageError::with_source(message, error);
    if retryable {
        storage.retryable().into()
    } else {
        storage.into()
    }
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

pub(crate) fn is_transient(error: &tokio_postgres::Error) -> bool {
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
