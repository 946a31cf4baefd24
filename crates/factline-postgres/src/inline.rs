//! Inline projections (C6) on PostgreSQL: read models the writer updates
//! inside the transaction that appends the events.

use async_trait::async_trait;
use factline_core::{InlineError, RecordedEvent, StoreError};
use tokio_postgres::Client;

/// A read model the PostgreSQL writer updates in the append's own
/// transaction.
///
/// The writer runs it on the slow path, after a batch's inserts and before
/// COMMIT, on the writer's connection (`client`, in the open transaction):
/// it is handed the events after its checkpoint up to the batch's last one
/// (which also covers events another process appended without it). When
/// it refuses an event of an append, the transaction is rolled back and
/// the batch is written again without that append, which fails with
/// [`factline_core::StoreError::InlineRefused`]; the others stand.
///
/// The trade-off is the SQLite one (see `factline_sqlite::InlineProjection`)
/// and more: batches with inline projections always take the slow path
/// (the positions must be known before the projection runs), and they hold
/// the head lock while it runs, so every writer of the database waits for
/// it.
#[async_trait]
pub trait InlineProjection: Send + Sync + 'static {
    /// Names it in errors.
    fn name(&self) -> &str;

    /// The last global position it has applied.
    async fn checkpoint(&mut self, client: &Client) -> Result<u64, InlineError>;

    /// Applies `events` (in global order, the first right after the
    /// checkpoint) and moves its checkpoint to the last one, on `client`
    /// inside the writer's transaction. [`InlineError::Refused`] names the
    /// refused event; [`InlineError::Failed`] fails the batch as a storage
    /// failure.
    async fn apply(&mut self, client: &Client, events: &[RecordedEvent])
        -> Result<(), InlineError>;

    /// What it wrote since the last commit was rolled back.
    fn rolled_back(&mut self) {}
}

/// Why inline projections could not be brought up to a position.
pub(crate) enum Refusal {
    /// A projection refused the event at this position.
    Event {
        position: u64,
        projection: String,
        message: String,
    },
    /// The database failed.
    Storage(factline_core::StoreError),
}

/// Brings every projection in `inline` up to `to` inside the open
/// transaction on `client`, reading the events with `read_all`
/// (`position >= $1 … LIMIT $2`).
pub(crate) async fn catch_up(
    client: &Client,
    read_all: &str,
    inline: &mut [Box<dyn InlineProjection>],
    to: u64,
) -> Result<(), Refusal> {
    const PAGE: i64 = 512;
    for projection in inline.iter_mut() {
        let name = projection.name().to_owned();
        let refused = |error: InlineError| match error {
            InlineError::Failed(failure) => Refusal::Storage(StoreError::Storage(failure)),
            InlineError::Refused { position, .. } => Refusal::Event {
                position,
                projection: name.clone(),
                message: error.to_string(),
            },
            other => Refusal::Storage(StoreError::Storage(
                factline_core::StorageError::with_source("an inline projection", other),
            )),
        };
        let mut from = match projection.checkpoint(client).await {
            Ok(at) => at + 1,
            Err(error) => return Err(refused(error)),
        };
        while from <= to {
            let rows = client
                .query(read_all, &[&(from as i64), &PAGE])
                .await
                .map_err(|e| {
                    Refusal::Storage(crate::pg_error(
                        "reading events for an inline projection",
                        e,
                    ))
                })?;
            let mut page = Vec::with_capacity(rows.len());
            for row in &rows {
                page.push(crate::decode_event(row).map_err(Refusal::Storage)?);
            }
            page.retain(|e| e.position <= to);
            let Some(last) = page.last().map(|e| e.position) else {
                break;
            };
            if let Err(error) = projection.apply(client, &page).await {
                return Err(refused(error));
            }
            from = last + 1;
        }
    }
    Ok(())
}
