//! The read side: a small pool of read connections used from
//! `spawn_blocking`, and the queries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::DateTime;
use factline_core::{
    Direction, JsonText, Metadata, ReadBudget, ReadStream, RecordedEvent, StorageError, StoreError,
    StreamFilter, StreamId, Tally,
};
use rusqlite::{params, Connection, Row};
use uuid::Uuid;

use crate::{db_error, open_connection, SqliteConfig};

pub(crate) struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    config: SqliteConfig,
    read_only: bool,
    idle: Mutex<Vec<Connection>>,
    runs: AtomicU64,
}

impl Pool {
    /// A pool of read connections, or (`read_only` false) of connections
    /// that may write.
    pub fn new(config: SqliteConfig, read_only: bool) -> Self {
        Pool {
            inner: Arc::new(PoolInner {
                config,
                read_only,
                idle: Mutex::new(Vec::new()),
                runs: AtomicU64::new(0),
            }),
        }
    }

    /// Runs `query` on a pooled connection off the async runtime.
    pub async fn run<T, F>(&self, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        inner.runs.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let conn = inner.take()?;
            let result = query(&conn);
            inner.give_back(conn);
            result
        })
        .await
        .map_err(|e| StorageError::new(format!("a read task failed: {e}")))?
    }
}

impl Pool {
    /// How many queries this pool has run.
    pub fn runs(&self) -> u64 {
        self.inner.runs.load(Ordering::Relaxed)
    }
}

impl PoolInner {
    fn take(&self) -> Result<Connection, StoreError> {
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match pooled {
            Some(conn) => Ok(conn),
            None => open_connection(&self.config, self.read_only),
        }
    }

    fn give_back(&self, conn: Connection) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.config.max_idle_readers {
                idle.push(conn);
            }
        }
    }
}

/// Selects a full recorded event; queries add their WHERE and ORDER BY.
const SELECT_EVENTS: &str = "SELECT e.position, s.stream_id, e.version, e.event_id, e.event_type, e.data, e.metadata, e.recorded_at
     FROM events e JOIN streams s ON s.stream_no = e.stream_no";

/// SQLite integers are signed; a limit beyond `i64::MAX` means "no limit".
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn sql_u64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn head_position(conn: &Connection) -> Result<u64, StoreError> {
    conn.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|p| p as u64)
    .map_err(db_error("reading the head position"))
}

/// Counts by category and type of the events in `(after, after + max]`,
/// up to the head: one range scan of the primary key.
pub(crate) fn tally(conn: &Connection, after: u64, max_events: u64) -> Result<Tally, StoreError> {
    let failed = db_error("counting events");
    let head = head_position(conn)?;
    let mut tally = Tally::new(head.min(after.saturating_add(max_events)));
    let mut statement = conn
        .prepare_cached(
            "SELECT category, event_type, count(*), sum(version = 1) FROM events
             WHERE position > ?1 AND position <= ?2 GROUP BY category, event_type",
        )
        .map_err(&failed)?;
    let mut rows = statement
        .query([after as i64, tally.upto as i64])
        .map_err(&failed)?;
    while let Some(row) = rows.next().map_err(&failed)? {
        let category: String = row.get(0).map_err(&failed)?;
        let event_type: String = row.get(1).map_err(&failed)?;
        let events: i64 = row.get(2).map_err(&failed)?;
        let started: i64 = row.get(3).map_err(&failed)?;
        tally.count(&category, &event_type, events as u64, started as u64);
    }
    Ok(tally)
}

pub(crate) fn read_stream(
    conn: &Connection,
    stream_id: &StreamId,
    options: ReadStream,
    max_bytes: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let (sql, from) = match options.direction {
        Direction::Forwards => (
            format!("{SELECT_EVENTS} WHERE s.stream_id = ?1 AND e.version >= ?2 ORDER BY e.version ASC LIMIT ?3"),
            options.from_version.unwrap_or(1),
        ),
        Direction::Backwards => (
            format!("{SELECT_EVENTS} WHERE s.stream_id = ?1 AND e.version <= ?2 ORDER BY e.version DESC LIMIT ?3"),
            options.from_version.unwrap_or(u64::MAX),
        ),
    };
    query_events(
        conn,
        &sql,
        params![stream_id.as_str(), sql_u64(from), sql_limit(options.limit)],
        max_bytes,
    )
}

/// The events of `filter` from `from`, at most `limit`, stopping once they
/// hold `max_bytes` of text (rows are stepped one by one, so the rest are
/// never read).
pub(crate) fn read_filtered(
    conn: &Connection,
    filter: &StreamFilter,
    from: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let (from, limit) = (sql_u64(from), sql_limit(limit));
    match filter {
        StreamFilter::All => query_events(
            conn,
            &format!("{SELECT_EVENTS} WHERE e.position >= ?1 ORDER BY e.position LIMIT ?2"),
            params![from, limit],
            max_bytes,
        ),
        StreamFilter::Category(category) => query_events(
            conn,
            &format!("{SELECT_EVENTS} WHERE e.category = ?1 AND e.position >= ?2 ORDER BY e.position LIMIT ?3"),
            params![category, from, limit],
            max_bytes,
        ),
        // Within one stream version order is position order, and the
        // (stream_no, version) index serves it without a sort.
        StreamFilter::Stream(stream_id) => query_events(
            conn,
            &format!("{SELECT_EVENTS} WHERE s.stream_id = ?1 AND e.position >= ?2 ORDER BY e.version LIMIT ?3"),
            params![stream_id.as_str(), from, limit],
            max_bytes,
        ),
    }
}

fn query_events(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    max_bytes: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let read_err = db_error("reading events");
    let mut stmt = conn.prepare_cached(sql).map_err(&read_err)?;
    let rows = stmt
        .query_map(params, RawEvent::from_row)
        .map_err(&read_err)?;
    let mut events = Vec::new();
    let mut budget = ReadBudget::new(max_bytes);
    for row in rows {
        let event = row.map_err(&read_err)?.decode()?;
        let spent = budget.take(&event);
        events.push(event);
        if spent {
            break;
        }
    }
    Ok(events)
}

/// A row as stored, before its JSON and ids are decoded.
struct RawEvent {
    position: i64,
    stream_id: String,
    version: i64,
    event_id: Vec<u8>,
    event_type: String,
    data: String,
    metadata: Option<String>,
    recorded_at: i64,
}

impl RawEvent {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawEvent {
            position: row.get(0)?,
            stream_id: row.get(1)?,
            version: row.get(2)?,
            event_id: row.get(3)?,
            event_type: row.get(4)?,
            data: row.get(5)?,
            metadata: row.get(6)?,
            recorded_at: row.get(7)?,
        })
    }

    fn decode(self) -> Result<RecordedEvent, StoreError> {
        let position = self.position;
        let corrupt = move |what: &str| -> StoreError {
            StorageError::new(format!(
                "stored event at position {position} has a corrupt {what}"
            ))
            .into()
        };
        Ok(RecordedEvent {
            stream_id: StreamId::new(self.stream_id).map_err(|_| corrupt("stream id"))?,
            version: self.version as u64,
            position: self.position as u64,
            event_id: Uuid::from_slice(&self.event_id).map_err(|_| corrupt("event id"))?,
            event_type: self.event_type,
            data: JsonText::parse(self.data).map_err(|_| corrupt("data"))?,
            metadata: match self.metadata {
                Some(text) => serde_json::from_str(&text).map_err(|_| corrupt("metadata"))?,
                None => Metadata::default(),
            },
            recorded_at: DateTime::from_timestamp_micros(self.recorded_at)
                .ok_or_else(|| corrupt("timestamp"))?,
        })
    }
}
