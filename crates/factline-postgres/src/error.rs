//! Mapping PostgreSQL failures onto [`StoreError`].

use factline_core::{StorageError, StoreError};

/// A storage error for a failed database call, marked retryable when the
/// same call may succeed later (lost connection, server restarting,
/// serialization failure, too many connections).
pub(crate) fn pg_error(context: &str, error: tokio_postgres::Error) -> StoreError {
    crate::sql::storage_error(context, error).into()
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
