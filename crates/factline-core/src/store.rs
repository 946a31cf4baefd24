use async_trait::async_trait;
use tokio::sync::watch;

use crate::{
    AppendResult, Appended, CommandKey, CommandRecord, EventData, ExpectedVersion, JsonText,
    RecordedEvent, Snapshot, StoreError, StreamId, Subscription,
};

/// Which way to read a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Direction {
    /// From the oldest event to the newest.
    #[default]
    Forwards,
    /// From the newest event to the oldest.
    Backwards,
}

/// How to read one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadStream {
    /// Which way to read.
    pub direction: Direction,
    /// First version returned (inclusive). `None` starts at the first event
    /// when reading forwards and at the last one when reading backwards.
    pub from_version: Option<u64>,
    /// At most this many events.
    pub limit: usize,
}

impl ReadStream {
    /// The whole stream, oldest first.
    pub fn forwards() -> Self {
        ReadStream {
            direction: Direction::Forwards,
            from_version: None,
            limit: usize::MAX,
        }
    }

    /// The whole stream, newest first.
    pub fn backwards() -> Self {
        ReadStream {
            direction: Direction::Backwards,
            ..Self::forwards()
        }
    }

    /// Starts at this stream version (inclusive), whichever the direction.
    pub fn from_version(mut self, version: u64) -> Self {
        self.from_version = Some(version);
        self
    }

    /// Reads at most `limit` events.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

/// Events per read of the default [`EventStore::read_filtered_bounded`].
pub const BOUNDED_CHUNK: usize = 64;

/// What a bounded read has taken of its byte budget. Every bounded read
/// counts through this, so all stop at the same event: the one that
/// spends the budget, which is still kept.
#[derive(Clone, Copy, Debug)]
pub struct ReadBudget {
    left: usize,
    spent: bool,
}

impl ReadBudget {
    /// A budget of `max_bytes` of stored text.
    pub fn new(max_bytes: usize) -> Self {
        ReadBudget {
            left: max_bytes,
            spent: false,
        }
    }

    /// Counts `event` (keep it); true once the budget is spent, so the read
    /// stops after it.
    pub fn take(&mut self, event: &RecordedEvent) -> bool {
        self.left = self.left.saturating_sub(event.text_len());
        self.spent = self.left == 0;
        self.spent
    }

    /// Whether the read must stop.
    pub fn is_spent(&self) -> bool {
        self.spent
    }
}

/// A set of events in global order: `$all`, one category, or one stream.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StreamFilter {
    /// Every event: `$all`.
    All,
    /// The events of every stream of one category.
    Category(String),
    /// The events of one stream.
    Stream(StreamId),
}

impl StreamFilter {
    /// Whether `event` is one this filter selects.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        match self {
            StreamFilter::All => true,
            StreamFilter::Category(c) => event.stream_id.category() == c,
            StreamFilter::Stream(s) => &event.stream_id == s,
        }
    }
}

/// Event counts over a range of positions (see [`EventStore::tally`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tally {
    /// The last position counted: ask again from here for what came after.
    pub upto: u64,
    /// One row per category and event type seen in the range.
    pub rows: Vec<TallyRow>,
}

/// Events of one category and type within a [`Tally`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TallyRow {
    /// The category of the events' streams.
    pub category: String,
    /// The event type.
    pub event_type: String,
    /// How many events.
    pub events: u64,
    /// How many of them were the first event of their stream: streams
    /// started in the range.
    pub streams_started: u64,
}

impl Tally {
    /// An empty tally that counted up to `upto`.
    pub fn new(upto: u64) -> Self {
        Tally {
            upto,
            rows: Vec::new(),
        }
    }

    /// Adds `events` of `event_type` in `category`, `streams_started` of
    /// them first in their stream.
    pub fn count(&mut self, category: &str, event_type: &str, events: u64, streams_started: u64) {
        match self
            .rows
            .iter_mut()
            .find(|r| r.category == category && r.event_type == event_type)
        {
            Some(row) => {
                row.events += events;
                row.streams_started += streams_started;
            }
            None => self.rows.push(TallyRow {
                category: category.to_owned(),
                event_type: event_type.to_owned(),
                events,
                streams_started,
            }),
        }
    }
}

/// The operations every event store backend provides.
///
/// Implementations are cheap-to-clone handles; clones share one store.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to one stream atomically: all of them or none.
    ///
    /// Appending events whose ids are all already stored in this stream, in
    /// this order, returns the original result and writes nothing (S3).
    async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError>;

    /// Appends like [`EventStore::append`] and stores the command's key and
    /// result in the same transaction (C3). When the key is already stored
    /// for the same command (same fingerprint, not expired), nothing is
    /// written and the stored record is returned, whatever the expected
    /// version; of several concurrent appends with one key exactly one
    /// writes. The key stored for another command is
    /// [`StoreError::CommandKeyReused`]. A rejected append stores no key.
    async fn append_command(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        command: &CommandKey,
    ) -> Result<Appended, StoreError>;

    /// The record stored under an idempotency key, unless it has expired.
    async fn find_command(&self, key: &str) -> Result<Option<CommandRecord>, StoreError>;

    /// Deletes the command records older than the retention
    /// ([`crate::Limits::command_retention`]) and says how many went. Stores
    /// also do this by themselves, at most every
    /// [`crate::Limits::command_purge_interval`], while commands come in.
    async fn purge_commands(&self) -> Result<u64, StoreError>;

    /// Keeps `data` as the stream's snapshot at `version`, replacing an
    /// older one, or one of another snapshot version (C4). A snapshot at a
    /// lower version than the kept one of the same snapshot version is
    /// dropped: concurrent savers cannot move a snapshot backwards.
    async fn save_snapshot(
        &self,
        stream_id: &StreamId,
        version: u64,
        snapshot_version: u32,
        data: &JsonText,
    ) -> Result<(), StoreError>;

    /// The stream's snapshot, if one is kept.
    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>, StoreError>;

    /// Reads one stream. A stream that does not exist reads as empty.
    async fn read_stream(
        &self,
        stream_id: &StreamId,
        options: ReadStream,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Reads the events matching `filter` with global position `>= from`, in
    /// global order, at most `limit` of them. Only committed events are
    /// returned, and never an event whose position is below one that a
    /// previous call already returned (no holes).
    async fn read_filtered(
        &self,
        filter: &StreamFilter,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// [`EventStore::read_filtered`] within a memory budget: stops once the
    /// events read hold `max_bytes` of data and metadata text, so a page of
    /// large events takes bounded memory. The event that crosses the budget
    /// is returned (so at least one is, when any matches); fewer than
    /// `limit` events does not mean the end was reached.
    ///
    /// The default reads chunks of [`BOUNDED_CHUNK`] events; backends that
    /// can stop reading rows part-way override it.
    async fn read_filtered_bounded(
        &self,
        filter: &StreamFilter,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut page = Vec::new();
        let mut budget = ReadBudget::new(max_bytes);
        let mut next = from;
        while page.len() < limit && !budget.is_spent() {
            let chunk = BOUNDED_CHUNK.min(limit - page.len());
            let events = self.read_filtered(filter, next, chunk).await?;
            let done = events.len() < chunk;
            for event in events {
                next = event.position + 1;
                let spent = budget.take(&event);
                page.push(event);
                if spent {
                    break;
                }
            }
            if done {
                break;
            }
        }
        Ok(page)
    }

    /// [`EventStore::read_stream`] within a memory budget, as
    /// [`EventStore::read_filtered_bounded`].
    async fn read_stream_bounded(
        &self,
        stream_id: &StreamId,
        options: ReadStream,
        max_bytes: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut page: Vec<RecordedEvent> = Vec::new();
        let mut budget = ReadBudget::new(max_bytes);
        let mut next = options.from_version;
        while page.len() < options.limit && !budget.is_spent() {
            let chunk = BOUNDED_CHUNK.min(options.limit - page.len());
            let read = ReadStream {
                direction: options.direction,
                from_version: next,
                limit: chunk,
            };
            let events = self.read_stream(stream_id, read).await?;
            let done = events.len() < chunk;
            for event in events {
                next = match options.direction {
                    Direction::Forwards => Some(event.version + 1),
                    Direction::Backwards => Some(event.version.saturating_sub(1)),
                };
                let spent = budget.take(&event);
                page.push(event);
                if spent {
                    break;
                }
            }
            if done || next == Some(0) {
                break;
            }
        }
        Ok(page)
    }

    /// Reads `$all` from global position `from` (inclusive).
    async fn read_all(&self, from: u64, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_filtered(&StreamFilter::All, from, limit).await
    }

    /// Reads a category from global position `from` (inclusive).
    async fn read_category(
        &self,
        category: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_filtered(&StreamFilter::Category(category.to_string()), from, limit)
            .await
    }

    /// The global position of the last committed event (0 when empty).
    async fn head_position(&self) -> Result<u64, StoreError>;

    /// Counts the committed events after position `after`, at most
    /// `max_events` positions of them, by category and event type, with the
    /// streams they started. A caller keeps a running total by asking again
    /// from [`Tally::upto`]; each call costs at most `max_events` rows, so a
    /// dashboard over a large store catches up in steps. Backends with SQL
    /// count in the database; this default reads the events.
    async fn tally(&self, after: u64, max_events: u64) -> Result<Tally, StoreError> {
        let head = self.head_position().await?;
        let upto = head.min(after.saturating_add(max_events));
        let mut tally = Tally {
            upto,
            rows: Vec::new(),
        };
        let mut from = after + 1;
        while from <= upto {
            let limit = usize::try_from(upto - from + 1)
                .unwrap_or(usize::MAX)
                .min(BOUNDED_CHUNK);
            let page = self.read_all(from, limit).await?;
            let Some(last) = page.last().map(|e| e.position) else {
                break;
            };
            for event in page.iter().filter(|e| e.position <= upto) {
                tally.count(
                    event.stream_id.category(),
                    &event.event_type,
                    1,
                    u64::from(event.version == 1),
                );
            }
            from = last + 1;
        }
        Ok(tally)
    }

    /// A receiver that changes whenever this process commits an append; its
    /// value is the head position after that commit.
    fn watch_head(&self) -> watch::Receiver<u64>;

    /// Follows `filter` from global position `from` (inclusive): first the
    /// stored events, then live ones as they are committed, with no gap and
    /// no duplicate at the hand-over.
    fn subscribe(&self, filter: StreamFilter, from: u64) -> Subscription;
}
