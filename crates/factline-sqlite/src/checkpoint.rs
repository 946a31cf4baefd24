//! WAL checkpoints on their own thread.
//!
//! SQLite normally checkpoints inside the commit that pushes the WAL past
//! 1000 pages, so one unlucky append pays for copying pages into the
//! database file and fsyncing it. The writer turns that off and instead
//! nudges this thread after commits; it runs PASSIVE checkpoints, which
//! never block the writer or readers.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::time::Duration;

use factline_core::{StorageError, StoreError};
use rusqlite::Connection;

use crate::{open_connection, SqliteConfig};

/// Checkpoints at most this often; commits in between share one.
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// Dropping it (with the writer) stops the thread.
pub(crate) struct Nudge(SyncSender<()>);

impl Nudge {
    pub fn after_commit(&self) {
        // A full channel means a checkpoint is already due.
        let _ = self.0.try_send(());
    }
}

pub(crate) fn spawn(config: &SqliteConfig) -> Result<Nudge, StoreError> {
    let conn = open_connection(config, false)?;
    let (nudge, nudged) = sync_channel(1);
    std::thread::Builder::new()
        .name("factline-sqlite-checkpoint".into())
        .spawn(move || run(conn, nudged))
        .map_err(|e| StorageError::with_source("starting the SQLite checkpoint thread", e))?;
    Ok(Nudge(nudge))
}

fn run(conn: Connection, nudged: Receiver<()>) {
    while nudged.recv().is_ok() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; will retry after the next commit");
        }
        std::thread::sleep(MIN_INTERVAL);
        if let Err(TryRecvError::Disconnected) = nudged.try_recv() {
            return;
        }
    }
}
