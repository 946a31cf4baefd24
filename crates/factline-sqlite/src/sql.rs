//! What every crate that talks to SQLite shares: telling failures that may
//! pass (a busy or locked database) from those that will not, and wrapping
//! them as [`StorageError`]s with their source. The store, the read models
//! and the outbox use these, so they classify the same failure the same
//! way.

use factline_core::{StorageError, StoreError};

/// Whether the same call may succeed later: the database was busy or
/// locked by another connection.
pub fn is_transient(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// A [`StorageError`] for a failed call, `context` saying what was being
/// done, retryable when [`is_transient`] says so, with the driver's error
/// as its source.
pub fn storage_error(context: &str, error: rusqlite::Error) -> StorageError {
    let retryable = is_transient(&error);
    let storage = StorageError::with_source(format!("{context}: {error}"), error);
    if retryable {
        storage.retryable()
    } else {
        storage
    }
}

/// Wraps a SQLite error as a storage failure. Busy/locked databases are
/// transient, so they are marked retryable.
pub(crate) fn db_error(context: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| storage_error(context, e).into()
}
