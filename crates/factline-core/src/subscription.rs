use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::sync::watch;

use crate::{DecodeError, DomainEvent, EventStore, RecordedEvent, StoreError, StreamFilter};

/// A subscription buffers at most one page, which ends at the event that
/// brings it to this many bytes: many subscribers of large events stay
/// small in memory.
pub const PAGE_BYTES: usize = 4 * 1024 * 1024;

/// Why [`Subscription::next_typed`] gave no typed event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TypedError {
    #[error(transparent)]
    /// Reading the store failed.
    Store(#[from] StoreError),
    /// The event at `position` did not decode (or upcast); the
    /// subscription has moved past it, so the caller decides whether to
    /// stop or go on.
    #[error("the event at position {position} cannot be read: {source}")]
    Decode {
        /// The event's global position.
        position: u64,
        /// Why it did not decode.
        #[source]
        source: DecodeError,
    },
}

/// A catch-up-then-live subscription.
///
/// It is pull-based, which gives backpressure for free: events are read from
/// the store in pages only when the consumer asks for more, so a slow consumer
/// never makes anything buffer without bound. The hand-over from catch-up to
/// live needs no special case: the subscription always reads from the store
/// after the last position it delivered, and only waits when a read comes
/// back empty.
///
/// Take events with [`Subscription::next`], or use it as a
/// [`futures_core::Stream`] of `Result<RecordedEvent, StoreError>` (it never
/// ends; an item that is an error leaves the position where it was, so the
/// next one tries again). Both are cancel-safe: a `next()` dropped half-way
/// reads again from where it stood, a `Stream` poll's read stays in flight
/// for the next call, and nothing is skipped or delivered twice. `next()`
/// reads in place; only the `Stream` form boxes a read per page.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use factline_core::{EventData, EventStore, ExpectedVersion, InMemoryStore,
/// StreamFilter, StreamId};
/// use futures_util::StreamExt;
///
/// let store = InMemoryStore::new();
/// let invoice = StreamId::new("Invoice-7").unwrap();
/// let issued = EventData::new("InvoiceIssued", serde_json::json!({ "cents": 4200 }));
/// store.append(&invoice, ExpectedVersion::NoStream, vec![issued]).await.unwrap();
///
/// let invoices = store.subscribe(StreamFilter::Category("Invoice".into()), 1);
/// let first: Vec<_> = invoices.take(1).collect().await;
/// assert_eq!(first[0].as_ref().unwrap().event_type, "InvoiceIssued");
/// # });
/// ```
pub struct Subscription {
    /// Where the subscription stands; `None` while a read is in flight.
    cursor: Option<Cursor>,
    /// The read in flight, which gives the cursor back when done.
    reading: Option<Reading>,
    /// Kept outside the cursor so they can be answered during a read.
    filter: StreamFilter,
    next_position: u64,
}

type Reading = Pin<Box<dyn Future<Output = (Cursor, Result<(), StoreError>)> + Send + 'static>>;

struct Cursor {
    store: Arc<dyn EventStore>,
    filter: StreamFilter,
    next_position: u64,
    buffer: VecDeque<RecordedEvent>,
    head: watch::Receiver<u64>,
    page_size: usize,
    fallback_poll: Option<Duration>,
}

impl Subscription {
    /// `fallback_poll` is for stores that other processes may write to: those
    /// commits do not reach this process's head watch, so an idle
    /// subscription re-reads at this interval as well.
    pub fn new(
        store: Arc<dyn EventStore>,
        filter: StreamFilter,
        from: u64,
        fallback_poll: Option<Duration>,
    ) -> Self {
        let head = store.watch_head();
        let next_position = from.max(1);
        Subscription {
            cursor: Some(Cursor {
                store,
                filter: filter.clone(),
                next_position,
                buffer: VecDeque::new(),
                head,
                page_size: 512,
                fallback_poll,
            }),
            reading: None,
            filter,
            next_position,
        }
    }

    /// Reads pages of at most `page_size` events (default 512).
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        if let Some(cursor) = &mut self.cursor {
            cursor.page_size = page_size.max(1);
        }
        self
    }

    /// What the subscription follows.
    pub fn filter(&self) -> &StreamFilter {
        &self.filter
    }

    /// Whether everything committed so far (as far as this process has
    /// heard) has been delivered: nothing is buffered and the head is
    /// behind the next position. Batching consumers commit then instead of
    /// waiting for more. `false` while a read is in flight.
    pub fn caught_up(&self) -> bool {
        self.cursor
            .as_ref()
            .is_some_and(|c| c.buffer.is_empty() && *c.head.borrow() < c.next_position)
    }

    /// The position the next read starts from.
    pub fn next_position(&self) -> u64 {
        self.cursor
            .as_ref()
            .map_or(self.next_position, |c| c.next_position)
    }

    /// Waits for and returns the next event.
    ///
    /// A transient storage failure (a lost connection, a restarting server)
    /// is retried with backoff from the last delivered position, so the
    /// consumer sees neither a gap nor a duplicate; only a permanent failure
    /// is returned.
    pub async fn next(&mut self) -> Result<RecordedEvent, StoreError> {
        // A read a `Stream` poll left in flight finishes first; then the
        // cursor is read in place, with nothing boxed per page.
        if let Some(reading) = self.reading.take() {
            let (cursor, filled) = reading.await;
            self.cursor = Some(cursor);
            filled?;
        }
        let Some(cursor) = self.cursor.as_mut() else {
            unreachable!("a subscription holds its cursor once no read is in flight");
        };
        loop {
            if let Some(event) = cursor.buffer.pop_front() {
                return Ok(event);
            }
            cursor.fill().await?;
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Result<RecordedEvent, StoreError>> {
        loop {
            if let Some(cursor) = &mut self.cursor {
                // The common case: an event of the page already read.
                if let Some(event) = cursor.buffer.pop_front() {
                    return Poll::Ready(Ok(event));
                }
                if let Some(mut cursor) = self.cursor.take() {
                    self.next_position = cursor.next_position;
                    self.reading = Some(Box::pin(async move {
                        let filled = cursor.fill().await;
                        (cursor, filled)
                    }));
                }
            }
            let Some(reading) = &mut self.reading else {
                unreachable!("a subscription holds its cursor or a read that gives it back");
            };
            let (cursor, filled) = ready!(reading.as_mut().poll(cx));
            self.reading = None;
            self.cursor = Some(cursor);
            filled?;
        }
    }

    /// The next event, decoded as `E` through `E`'s upcasters (C5), with the
    /// event as recorded.
    pub async fn next_typed<E: DomainEvent>(&mut self) -> Result<(RecordedEvent, E), TypedError> {
        let event = self.next().await?;
        match E::from_recorded(&event) {
            Ok(typed) => Ok((event, typed)),
            Err(source) => Err(TypedError::Decode {
                position: event.position,
                source,
            }),
        }
    }
}

impl futures_core::Stream for Subscription {
    type Item = Result<RecordedEvent, StoreError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx).map(Some)
    }
}

impl Cursor {
    /// Reads until the buffer holds at least one event.
    async fn fill(&mut self) -> Result<(), StoreError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            // Mark the current head as seen *before* reading, so a commit
            // that lands after the read still wakes the wait below.
            self.head.borrow_and_update();
            let page = match self
                .store
                .read_filtered_bounded(&self.filter, self.next_position, self.page_size, PAGE_BYTES)
                .await
            {
                Ok(page) => page,
                Err(StoreError::Storage(e)) if e.is_retryable() => {
                    tracing::warn!(error = %e, position = self.next_position, "subscription read failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(last) = page.last() {
                self.next_position = last.position + 1;
                self.buffer.extend(page);
                return Ok(());
            }
            self.wait_for_commit().await;
        }
    }

    async fn wait_for_commit(&mut self) {
        match self.fallback_poll {
            Some(interval) => {
                // A timeout just means "look again".
                let _ = tokio::time::timeout(interval, self.head.changed()).await;
            }
            None => {
                if self.head.changed().await.is_err() {
                    // The store is gone; nothing new can arrive from this
                    // process, so fall back to polling rather than spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;
    use serde_json::json;

    use super::*;
    use crate::{
        AppendResult, EventData, ExpectedVersion, InMemoryStore, ReadStream, StorageError, StreamId,
    };

    /// Fails reads of `$all` while `failures` is above zero, then delegates.
    struct Flaky {
        store: InMemoryStore,
        failures: AtomicU32,
        retryable: bool,
    }

    #[async_trait]
    impl EventStore for Flaky {
        async fn append(
            &self,
            stream_id: &StreamId,
            expected: ExpectedVersion,
            events: Vec<EventData>,
        ) -> Result<AppendResult, StoreError> {
            self.store.append(stream_id, expected, events).await
        }
        async fn append_command(
            &self,
            stream_id: &StreamId,
            expected: ExpectedVersion,
            events: Vec<EventData>,
            command: &crate::CommandKey,
        ) -> Result<crate::Appended, StoreError> {
            let store = &self.store;
            store
                .append_command(stream_id, expected, events, command)
                .await
        }
        async fn find_command(
            &self,
            key: &str,
        ) -> Result<Option<crate::CommandRecord>, StoreError> {
            self.store.find_command(key).await
        }
        async fn purge_commands(&self) -> Result<u64, StoreError> {
            self.store.purge_commands().await
        }
        async fn save_snapshot(
            &self,
            stream_id: &StreamId,
            version: u64,
            snapshot_version: u32,
            data: &crate::JsonText,
        ) -> Result<(), StoreError> {
            let store = &self.store;
            store
                .save_snapshot(stream_id, version, snapshot_version, data)
                .await
        }
        async fn load_snapshot(
            &self,
            stream_id: &StreamId,
        ) -> Result<Option<crate::Snapshot>, StoreError> {
            self.store.load_snapshot(stream_id).await
        }
        async fn read_stream(
            &self,
            stream_id: &StreamId,
            options: ReadStream,
        ) -> Result<Vec<RecordedEvent>, StoreError> {
            self.store.read_stream(stream_id, options).await
        }
        async fn read_filtered(
            &self,
            filter: &StreamFilter,
            from: u64,
            limit: usize,
        ) -> Result<Vec<RecordedEvent>, StoreError> {
            let left = self.failures.load(Ordering::SeqCst);
            if left > 0 {
                self.failures.store(left - 1, Ordering::SeqCst);
                let e = StorageError::new("connection lost");
                return Err(if self.retryable { e.retryable() } else { e }.into());
            }
            self.store.read_filtered(filter, from, limit).await
        }
        async fn head_position(&self) -> Result<u64, StoreError> {
            self.store.head_position().await
        }
        fn watch_head(&self) -> watch::Receiver<u64> {
            self.store.watch_head()
        }
        fn subscribe(&self, _: StreamFilter, _: u64) -> Subscription {
            unreachable!("the tests build subscriptions directly")
        }
    }

    async fn flaky(failures: u32, retryable: bool) -> Arc<Flaky> {
        let store = InMemoryStore::new();
        for n in 0..5 {
            store
                .append(
                    &StreamId::new("Order-1").unwrap(),
                    ExpectedVersion::Any,
                    vec![EventData::new("Tested", json!({ "n": n }))],
                )
                .await
                .unwrap();
        }
        Arc::new(Flaky {
            store,
            failures: AtomicU32::new(failures),
            retryable,
        })
    }

    #[tokio::test]
    async fn transient_read_failures_are_retried_without_gap_or_duplicate() {
        let store = flaky(0, true).await;
        let mut sub =
            Subscription::new(store.clone(), StreamFilter::All, 1, None).with_page_size(2);
        assert_eq!(sub.next().await.unwrap().position, 1);
        assert_eq!(sub.next().await.unwrap().position, 2);
        // The next page read fails three times before it succeeds.
        store.failures.store(3, Ordering::SeqCst);
        let rest: Vec<u64> = [
            sub.next().await.unwrap(),
            sub.next().await.unwrap(),
            sub.next().await.unwrap(),
        ]
        .iter()
        .map(|e| e.position)
        .collect();
        assert_eq!(rest, vec![3, 4, 5]);
        assert_eq!(store.failures.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn permanent_read_failures_are_returned() {
        let store = flaky(1, false).await;
        let mut sub = Subscription::new(store.clone(), StreamFilter::All, 1, None);
        match sub.next().await {
            Err(StoreError::Storage(e)) => assert!(!e.is_retryable()),
            other => panic!("expected the storage failure, got {other:?}"),
        }
        // Nothing was skipped: the next call starts where it stood.
        assert_eq!(sub.next().await.unwrap().position, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn as_a_stream_it_catches_up_goes_live_and_survives_cancelled_polls() {
        use futures_util::StreamExt;

        let store = Arc::new(InMemoryStore::new());
        let id = StreamId::new("Invoice-1").unwrap();
        let (shared, id) = (store.clone(), id.clone());
        let append = move |n: u64| {
            let (store, id) = (shared.clone(), id.clone());
            async move {
                store
                    .append(
                        &id,
                        ExpectedVersion::Any,
                        vec![EventData::new("E", json!({ "n": n }))],
                    )
                    .await
                    .unwrap();
            }
        };
        for n in 1..=3 {
            append(n).await;
        }
        let mut sub = store.subscribe(StreamFilter::All, 1).with_page_size(2);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(sub.next().await.unwrap().position);
        }
        // Caught up: polls that wait for a commit are dropped half-way, as a
        // select! with a timeout does, through both forms; the next ones
        // finish the same read.
        for _ in 0..2 {
            let waited = tokio::time::timeout(Duration::from_millis(20), sub.next()).await;
            assert!(waited.is_err(), "nothing new was committed");
            assert!(sub.caught_up(), "next() reads in place");
        }
        for _ in 0..2 {
            let waited =
                tokio::time::timeout(Duration::from_millis(20), StreamExt::next(&mut sub)).await;
            assert!(waited.is_err(), "nothing new was committed");
            assert!(!sub.caught_up(), "a stream's read is in flight");
        }
        let writer = tokio::spawn(async move {
            for n in 4..=40 {
                append(n).await;
            }
        });
        while seen.len() < 40 {
            match sub.next().await {
                Ok(event) => seen.push(event.position),
                Err(e) => panic!("{e}"),
            }
        }
        writer.await.unwrap();
        assert_eq!(seen, (1..=40).collect::<Vec<u64>>(), "no gap, no duplicate");
        assert!(sub.caught_up());
        let mut more = store.subscribe(StreamFilter::All, 38);
        let tail: Vec<u64> = (&mut more)
            .take(3)
            .map(|e| e.unwrap().position)
            .collect()
            .await;
        assert_eq!(tail, vec![38, 39, 40]);
    }
}
