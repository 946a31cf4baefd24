use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{EventStore, RecordedEvent, StoreError, StreamFilter};

/// A catch-up-then-live subscription.
///
/// It is pull-based, which gives backpressure for free: events are read from
/// the store in pages only when the consumer asks for more, so a slow consumer
/// never makes anything buffer without bound. The hand-over from catch-up to
/// live needs no special case: the subscription always reads from the store
/// after the last position it delivered, and only waits when a read comes
/// back empty.
pub struct Subscription {
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
        Subscription {
            store,
            filter,
            next_position: from.max(1),
            buffer: VecDeque::new(),
            head,
            page_size: 512,
            fallback_poll,
        }
    }

    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    pub fn filter(&self) -> &StreamFilter {
        &self.filter
    }

    /// The position the next read starts from.
    pub fn next_position(&self) -> u64 {
        self.next_position
    }

    /// Waits for and returns the next event.
    pub async fn next(&mut self) -> Result<RecordedEvent, StoreError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                return Ok(event);
            }
            // Mark the current head as seen *before* reading, so a commit
            // that lands after the read still wakes the wait below.
            self.head.borrow_and_update();
            let page = self
                .store
                .read_filtered(&self.filter, self.next_position, self.page_size)
                .await?;
            if let Some(last) = page.last() {
                self.next_position = last.position + 1;
                self.buffer.extend(page);
                continue;
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
