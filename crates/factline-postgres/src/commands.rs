//! Command records (C3) as stored rows.

use factline_core::{AppendResult, CommandRecord, StorageError, StoreError, StreamId};
use tokio_postgres::Row;

/// A row of `find_commands`.
pub(crate) fn decode_command(row: &Row) -> Result<CommandRecord, StoreError> {
    let key: String = row.get(0);
    let stream_id = StreamId::new(row.get::<_, String>(2)).map_err(|e| {
        StorageError::new(format!(
            "the record of command key {key:?} has a corrupt stream id: {e}"
        ))
    })?;
    Ok(CommandRecord {
        fingerprint: row.get(1),
        result: AppendResult {
            stream_id,
            first_version: row.get::<_, i64>(3) as u64,
            last_version: row.get::<_, i64>(4) as u64,
            first_position: row.get::<_, i64>(5) as u64,
            last_position: row.get::<_, i64>(6) as u64,
        },
        event_ids: row.get(7),
        recorded_at: row.get(8),
        key,
    })
}
