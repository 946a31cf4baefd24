//! Command records (C3) and snapshots (C4): their queries, used by the
//! writer (records, in the append's transaction) and by the store.

use chrono::{DateTime, Utc};
use factline_core::{
    AppendResult, CommandRecord, JsonText, Snapshot, StorageError, StoreError, StreamId,
};
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use crate::db_error;

/// The record stored under `key`, expired or not.
pub(crate) fn find(
    conn: &Connection,
    key: &str,
) -> rusqlite::Result<Result<Option<CommandRecord>, StoreError>> {
    let row = conn
        .prepare_cached(
            "SELECT fingerprint, stream_id, first_version, last_version, first_position,
                    last_position, event_ids, recorded_at
             FROM commands WHERE key = ?1",
        )?
        .query_row([key], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                [r.get::<_, i64>(2)?, r.get(3)?, r.get(4)?, r.get(5)?],
                r.get::<_, Vec<u8>>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })
        .optional()?;
    let Some((fingerprint, stream, [fv, lv, fp, lp], ids, recorded_at)) = row else {
        return Ok(Ok(None));
    };
    let corrupt = |what: &str| -> StoreError {
        StorageError::new(format!(
            "the record of command key {key:?} has a corrupt {what}"
        ))
        .into()
    };
    let decoded = (|| {
        let stream_id = StreamId::new(stream).map_err(|_| corrupt("stream id"))?;
        if ids.len() % 16 != 0 {
            return Err(corrupt("event id list"));
        }
        let event_ids = ids
            .chunks_exact(16)
            .map(|id| Uuid::from_slice(id).map_err(|_| corrupt("event id")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(CommandRecord {
            key: key.to_owned(),
            fingerprint,
            result: AppendResult {
                stream_id,
                first_version: fv as u64,
                last_version: lv as u64,
                first_position: fp as u64,
                last_position: lp as u64,
            },
            event_ids,
            recorded_at: DateTime::from_timestamp_micros(recorded_at)
                .ok_or_else(|| corrupt("timestamp"))?,
        }))
    })();
    Ok(decoded)
}

/// Stores `record`, replacing an expired one under the same key.
pub(crate) fn insert(conn: &Connection, record: &CommandRecord) -> rusqlite::Result<()> {
    let ids: Vec<u8> = record
        .event_ids
        .iter()
        .flat_map(|id| *id.as_bytes())
        .collect();
    let r = &record.result;
    conn.prepare_cached(
        "INSERT OR REPLACE INTO commands (key, fingerprint, stream_id, first_version,
             last_version, first_position, last_position, event_ids, recorded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        record.key,
        record.fingerprint,
        r.stream_id.as_str(),
        r.first_version as i64,
        r.last_version as i64,
        r.first_position as i64,
        r.last_position as i64,
        ids,
        record.recorded_at.timestamp_micros(),
    ])?;
    Ok(())
}

/// Deletes the records recorded before `cutoff`.
pub(crate) fn purge(conn: &Connection, cutoff: DateTime<Utc>) -> rusqlite::Result<u64> {
    conn.prepare_cached("DELETE FROM commands WHERE recorded_at < ?1")?
        .execute([cutoff.timestamp_micros()])
        .map(|n| n as u64)
}

pub(crate) fn save_snapshot(
    conn: &Connection,
    stream_id: &StreamId,
    version: u64,
    snapshot_version: u32,
    data: &JsonText,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO snapshots (stream_id, version, snapshot_version, data, recorded_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (stream_id) DO UPDATE SET
             version = excluded.version,
             snapshot_version = excluded.snapshot_version,
             data = excluded.data,
             recorded_at = excluded.recorded_at
         WHERE excluded.version >= snapshots.version
            OR excluded.snapshot_version <> snapshots.snapshot_version",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            stream_id.as_str(),
            version as i64,
            snapshot_version,
            data.as_str(),
            Utc::now().timestamp_micros(),
        ])
    })
    .map(|_| ())
    .map_err(db_error("saving a snapshot"))
}

pub(crate) fn load_snapshot(
    conn: &Connection,
    stream_id: &StreamId,
) -> Result<Option<Snapshot>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT version, snapshot_version, data, recorded_at FROM snapshots WHERE stream_id = ?1",
        )
        .and_then(|mut stmt| {
            stmt.query_row([stream_id.as_str()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .optional()
        })
        .map_err(db_error("loading a snapshot"))?;
    let Some((version, snapshot_version, data, recorded_at)) = row else {
        return Ok(None);
    };
    let corrupt = |what: &str| -> StoreError {
        StorageError::new(format!("the snapshot of {stream_id} has a corrupt {what}")).into()
    };
    Ok(Some(Snapshot {
        stream_id: stream_id.clone(),
        version: version as u64,
        snapshot_version,
        data: serde_json::from_str(&data).map_err(|_| corrupt("data"))?,
        recorded_at: DateTime::from_timestamp_micros(recorded_at)
            .ok_or_else(|| corrupt("timestamp"))?,
    }))
}
