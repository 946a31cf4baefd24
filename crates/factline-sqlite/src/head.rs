//! Commits of other processes reach this process's subscribers through
//! one poll of the head per store, however many subscriptions wait: an
//! idle subscription costs no query.

use std::sync::{Arc, Weak};

use tokio::sync::watch;

use crate::{open_connection, reader, SqliteConfig, StoreError};

/// Starts the thread that reads the head every `config.fallback_poll`
/// while anyone watches it, and moves the head watch forward when another
/// process committed. It ends with the store.
pub(crate) fn spawn(
    config: &SqliteConfig,
    head: &Arc<watch::Sender<u64>>,
) -> Result<(), StoreError> {
    let conn = open_connection(config, true)?;
    let head: Weak<watch::Sender<u64>> = Arc::downgrade(head);
    let interval = config.fallback_poll;
    std::thread::Builder::new()
        .name("factline-sqlite-head".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            let Some(head) = head.upgrade() else {
                return;
            };
            if head.receiver_count() == 0 {
                continue;
            }
            // A failed read is tried again at the next tick.
            if let Ok(now) = reader::head_position(&conn) {
                head.send_if_modified(|known| {
                    let newer = now > *known;
                    if newer {
                        *known = now;
                    }
                    newer
                });
            }
        })
        .map_err(|e| {
            factline_core::StorageError::new(format!("starting the head poll thread: {e}")).into()
        })
        .map(drop)
}
