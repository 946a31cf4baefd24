//! Inline projections (C6): read models updated by the writer inside the
//! transaction that appends the events, so they are never behind the log.

use factline_core::{InlineError, RecordedEvent, StorageError, StoreError, StreamFilter};
use rusqlite::Transaction;

/// A read model the writer updates in the append's own transaction.
///
/// For each append the writer reads the events after the projection's
/// checkpoint up to the append's last one (its own events, and any that
/// another process appended without this projection) and hands them over
/// on a savepoint: a refusal rolls back that append alone, which fails
/// with [`factline_core::StoreError::InlineRefused`]. When the store
/// opens, the writer first catches every inline projection up to the head.
///
/// The trade-off: reads of the model are never stale, but every append
/// pays for the projection's writes while holding the write lock, and an
/// event the projection cannot apply blocks appends until it is fixed.
/// Use it for the few read models that must be exact at once (a unique
/// e-mail address, a balance checked on the next command); keep the rest
/// asynchronous.
pub trait InlineProjection: Send + 'static {
    /// Names it in errors.
    fn name(&self) -> &str;

    /// The last global position it has applied.
    fn checkpoint(&mut self, tx: &Transaction<'_>) -> Result<u64, InlineError>;

    /// Applies `events` (in global order, the first right after the
    /// checkpoint) and moves its checkpoint to the last one, inside `tx`.
    /// [`InlineError::Refused`] refuses the append; [`InlineError::Failed`]
    /// fails it as a storage failure.
    fn apply(&mut self, tx: &Transaction<'_>, events: &[RecordedEvent]) -> Result<(), InlineError>;

    /// What it wrote since the last commit was rolled back: forget
    /// anything remembered about it (tables created, say).
    fn rolled_back(&mut self) {}
}

/// Brings every projection in `inline` up to `to` inside `tx`; the first
/// refusal or failure is returned with the projection's name.
pub(crate) fn catch_up(
    tx: &Transaction<'_>,
    inline: &mut [Box<dyn InlineProjection>],
    to: u64,
) -> rusqlite::Result<Result<(), (String, InlineError)>> {
    const PAGE: usize = 512;
    for projection in inline.iter_mut() {
        let refused =
            |p: &dyn InlineProjection, error: InlineError| Ok(Err((p.name().to_owned(), error)));
        let mut from = match projection.checkpoint(tx) {
            Ok(at) => at + 1,
            Err(error) => return refused(projection.as_ref(), error),
        };
        while from <= to {
            let mut page = match crate::reader::read_filtered(
                tx,
                &StreamFilter::All,
                from,
                PAGE,
                usize::MAX,
            ) {
                Ok(page) => page,
                Err(StoreError::Storage(e)) => return refused(projection.as_ref(), e.into()),
                Err(other) => {
                    let failed = StorageError::with_source("reading the events", other);
                    return refused(projection.as_ref(), failed.into());
                }
            };
            page.retain(|e| e.position <= to);
            let Some(last) = page.last().map(|e| e.position) else {
                break;
            };
            if let Err(error) = projection.apply(tx, &page) {
                return refused(projection.as_ref(), error);
            }
            from = last + 1;
        }
    }
    Ok(Ok(()))
}
