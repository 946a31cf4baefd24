//! Turning the rows of event reads into recorded events.

use chrono::{DateTime, Utc};
use factline_core::{JsonText, Metadata, RecordedEvent, StorageError, StoreError, StreamId};
use tokio_postgres::Row;

/// PostgreSQL integers are signed; a limit beyond `i64::MAX` means "no limit".
pub(crate) fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

pub(crate) fn sql_u64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn decode_event(row: &Row) -> Result<RecordedEvent, StoreError> {
    let position = row.get::<_, i64>(0) as u64;
    let corrupt = |what: String| -> StoreError {
        StorageError::new(format!(
            "the event at position {position} is corrupt: {what}"
        ))
        .into()
    };
    let stream_id =
        StreamId::new(row.get::<_, String>(1)).map_err(|e| corrupt(format!("stream id: {e}")))?;
    let data: &str = row.get(5);
    let metadata: Option<&str> = row.get(6);
    Ok(RecordedEvent {
        stream_id,
        version: row.get::<_, i64>(2) as u64,
        position,
        event_id: row.get(3),
        event_type: row.get(4),
        data: JsonText::parse(data).map_err(|e| corrupt(format!("data: {e}")))?,
        metadata: match metadata {
            None => Metadata::default(),
            Some(text) => {
                serde_json::from_str(text).map_err(|e| corrupt(format!("metadata: {e}")))?
            }
        },
        recorded_at: row.get::<_, DateTime<Utc>>(7),
    })
}
