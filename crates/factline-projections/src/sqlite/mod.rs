//! Read models in a SQLite file: the same file as the events or another.

mod admin;
mod checkpoints;
mod diff;
mod inline;
mod parking;
mod portable;
mod schema;
mod sink;
mod versions;

pub use admin::*;
pub use checkpoints::*;
use diff::*;
pub use inline::*;
use parking::*;
use schema::*;
pub use sink::*;

use factline_core::{InlineError, StorageError};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_core::RecordedEvent;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::diff::{diff_sql, row_value, whole_table_sql, Dialect, Pair};
use crate::parking::Handling;
use crate::tables::{
    check_partitions, checkpoint_key, may_write, owned_events, Active, Mode, Partition, Tables,
};
use crate::{ApplyError, ProjectionError, Sink, VersionedSink};
use crate::{DiffReport, ParkedEvent, Parking, RetryReport, TableDiff};

/// A projection whose read model is in SQLite.
pub trait SqliteProjection: Send + 'static {
    /// Unique among the projections of one read-model database.
    fn name(&self) -> &str;

    /// The read model's version: a new one is built beside the active one
    /// by a rebuild, then swapped in.
    fn version(&self) -> u32 {
        1
    }

    /// A digest of the definition that decides the read model's content
    /// (declared read models have one): a version is never continued from
    /// another definition. `None` for code, whose version says it all.
    fn fingerprint(&self) -> Option<String> {
        None
    }

    /// The logical names of the tables it writes; readers query views of
    /// these names, writes go to [`Tables::get`].
    fn tables(&self) -> &[&str];

    /// Told when a run starts, before its first batch (see
    /// [`crate::SqlProjection::resuming`]).
    fn resuming(&mut self, checkpoint: u64, sole_writer: bool) {
        let _ = (checkpoint, sole_writer);
    }

    /// Creates this version's tables if they are missing. Runs in the
    /// first batch's transaction of every run.
    fn setup(&mut self, tx: &Transaction<'_>, tables: &Tables) -> rusqlite::Result<()>;

    /// Applies one event inside the batch's transaction.
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ApplyError>;

    /// Applies a run of events with nothing to park among them; an
    /// implementation may do them together (set-based statements); on
    /// failure it names the event that failed (or the run's first).
    fn apply_all(
        &mut self,
        tx: &Transaction<'_>,
        tables: &Tables,
        events: &[RecordedEvent],
    ) -> Result<(), (u64, ApplyError)> {
        for event in events {
            self.apply(tx, tables, event)
                .map_err(|e| (event.position, e))?;
        }
        Ok(())
    }
}
