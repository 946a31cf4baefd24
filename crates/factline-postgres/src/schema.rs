//! Versioned schema migrations and the SQL text of every statement, written
//! for the configured schema name.

use factline_core::{StorageError, StoreError};
use tokio_postgres::Client;

use crate::sql::pg_error;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i32 = 2;

/// Each entry upgrades the schema from version `index` to `index + 1`; `{s}`
/// stands for the quoted schema name. Entries are never edited once
/// released; changes are new entries.
const MIGRATIONS: &[&str] = &[
    // 1: streams, the event log, and the head row.
    //
    // `head` is one row holding the last position and stream number handed
    // out. Every append transaction locks it first and keeps the lock until
    // it commits, which is what makes the global order hole-free (see
    // ARCHITECTURE.md). Positions and stream numbers are assigned by the
    // writer under that lock, so they have no gaps either.
    //
    // `streams` maps a stream id to its number once and is never updated: a
    // stream's version is its newest event's, one index probe away, so an
    // append writes no row but its events (and a new stream's name).
    //
    // Event data is `json`, not `jsonb`: it keeps the text exactly as sent
    // and accepts every valid JSON document (jsonb refuses `\u0000`), and a
    // read model can still cast it to jsonb to query it.
    "CREATE TABLE {s}.head (
        id             boolean PRIMARY KEY DEFAULT true CHECK (id),
        last_position  bigint  NOT NULL,
        last_stream_no bigint  NOT NULL
    );
    INSERT INTO {s}.head (id, last_position, last_stream_no) VALUES (true, 0, 0);
    CREATE TABLE {s}.streams (
        stream_no bigint PRIMARY KEY,
        stream_id text   NOT NULL UNIQUE,
        category  text   NOT NULL
    );
    CREATE TABLE {s}.events (
        position    bigint      PRIMARY KEY,
        stream_no   bigint      NOT NULL,
        version     bigint      NOT NULL,
        category    text        NOT NULL,
        event_id    uuid        NOT NULL UNIQUE,
        event_type  text        NOT NULL,
        data        json        NOT NULL,
        metadata    json,
        recorded_at timestamptz NOT NULL,
        UNIQUE (stream_no, version)
    );
    CREATE INDEX events_category_position ON {s}.events (category, position);",
    // 2: command idempotency keys (C3) and snapshots (C4).
    //
    // A command's key and result are written by the writer in the append's
    // transaction, under the head lock, so two processes cannot both store
    // one key. `recorded_at` is indexed for the retention purge.
    "CREATE TABLE {s}.commands (
        key            text        PRIMARY KEY,
        fingerprint    text        NOT NULL,
        stream_id      text        NOT NULL,
        first_version  bigint      NOT NULL,
        last_version   bigint      NOT NULL,
        first_position bigint      NOT NULL,
        last_position  bigint      NOT NULL,
        event_ids      uuid[]      NOT NULL,
        recorded_at    timestamptz NOT NULL
    );
    CREATE INDEX commands_recorded_at ON {s}.commands (recorded_at);
    CREATE TABLE {s}.snapshots (
        stream_id        text        PRIMARY KEY,
        version          bigint      NOT NULL,
        snapshot_version integer     NOT NULL,
        data             json        NOT NULL,
        recorded_at      timestamptz NOT NULL
    );",
];

pub(crate) use crate::sql::quote_ident;

/// Checks a schema name before it goes into SQL text.
pub(crate) fn validate_schema_name(name: &str) -> Result<(), StoreError> {
    let valid = !name.is_empty()
        && name.len() <= 50
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && !name.starts_with("pg_");
    if valid {
        Ok(())
    } else {
        Err(StoreError::invalid_input(format!(
            "schema name {name:?} must be 1 to 50 lower-case letters, digits or _, not start with a digit or pg_"
        )))
    }
}

/// Brings the store's tables up to [`SCHEMA_VERSION`] through the one
/// migration mechanism ([`crate::migrate`], component `store`). Safe when
/// several processes start at once: it runs under the schema's migration
/// lock. Schemas of earlier builds tracked the version in `schema_version`
/// only: it is adopted, and kept up to date for them.
pub(crate) async fn migrate(client: &mut Client, schema: &str) -> Result<(), StoreError> {
    let s = quote_ident(schema);
    let err = |e| pg_error("migrating the schema", e);
    let tx = client.transaction().await.map_err(err)?;
    crate::migrate::lock_and_prepare(&tx, schema)
        .await
        .map_err(err)?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {s}.schema_version (
             version    integer     PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(err)?;
    let legacy: i32 = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {s}.schema_version"),
            &[],
        )
        .await
        .map_err(err)?
        .get(0);
    if legacy > SCHEMA_VERSION {
        return Err(StorageError::new(format!(
            "the schema {schema:?} is at version {legacy}, newer than this factline ({SCHEMA_VERSION}); upgrade factline"
        ))
        .into());
    }
    crate::migrate::adopt(&tx, schema, STORE, i64::from(legacy))
        .await
        .map_err(err)?;
    crate::migrate::apply_in(&tx, schema, STORE, MIGRATIONS).await?;
    tx.execute(
        &format!(
            "INSERT INTO {s}.schema_version (version)
             SELECT v FROM generate_series(1, $1::integer) v ON CONFLICT DO NOTHING"
        ),
        &[&SCHEMA_VERSION],
    )
    .await
    .map_err(err)?;
    tx.commit().await.map_err(err)
}

/// The store's component name in `factline_migrations`.
pub const STORE: &str = "store";

/// Every statement the store runs, for one schema.
pub(crate) struct Sql {
    pub head: String,
    pub lock_head: String,
    pub update_head: String,
    pub find_streams: String,
    pub find_events: String,
    pub insert_streams: String,
    pub insert_events: String,
    pub insert_streams_relative: String,
    pub insert_events_relative: String,
    pub advance_head: String,
    pub append_in_one: String,
    pub read_stream_forwards: String,
    pub read_stream_backwards: String,
    pub read_all: String,
    pub read_category: String,
    pub read_one_stream: String,
    pub find_commands: String,
    pub insert_commands: String,
    pub purge_commands: String,
    pub save_snapshot: String,
    pub load_snapshot: String,
    pub tally: String,
    /// The LISTEN/NOTIFY channel commits are announced on.
    pub channel: String,
}

const EVENT_COLUMNS: &str =
    "e.position, s.stream_id, e.version, e.event_id, e.event_type, e.data::text, e.metadata::text, e.recorded_at";

impl Sql {
    pub fn new(schema: &str) -> Sql {
        let s = quote_ident(schema);
        let select = format!(
            "SELECT {EVENT_COLUMNS} FROM {s}.events e JOIN {s}.streams s ON s.stream_no = e.stream_no"
        );
        Sql {
            head: format!("SELECT last_position FROM {s}.head"),
            tally: format!(
                "SELECT category, event_type, count(*), count(*) FILTER (WHERE version = 1)
                 FROM {s}.events WHERE position > $1 AND position <= $2 GROUP BY 1, 2"
            ),
            lock_head: format!("SELECT last_position, last_stream_no FROM {s}.head FOR UPDATE"),
            // The notification goes out when the transaction commits, and
            // not at all if it rolls back.
            update_head: format!(
                "WITH h AS (UPDATE {s}.head SET last_position = $1, last_stream_no = $2 RETURNING last_position)
                 SELECT pg_notify($3, last_position::text) FROM h"
            ),
            find_streams: format!(
                "SELECT s.stream_id, s.stream_no,
                        (SELECT max(e.version) FROM {s}.events e WHERE e.stream_no = s.stream_no)
                 FROM {s}.streams s WHERE s.stream_id = ANY($1)"
            ),
            find_events: format!(
                "SELECT e.event_id, s.stream_id, e.version, e.position,
                        e.event_type, e.data::text, e.metadata::text
                 FROM {s}.events e JOIN {s}.streams s ON s.stream_no = e.stream_no
                 WHERE e.event_id = ANY($1)"
            ),
            insert_streams: format!(
                "INSERT INTO {s}.streams (stream_no, stream_id, category)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])"
            ),
            insert_events: format!(
                "INSERT INTO {s}.events
                     (position, stream_no, version, category, event_id, event_type, data, metadata, recorded_at)
                 SELECT u.position, u.stream_no, u.version, u.category, u.event_id, u.event_type,
                        u.data::json, u.metadata::json, $9
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::uuid[],
                             $6::text[], $7::text[], $8::text[])
                      AS u(position, stream_no, version, category, event_id, event_type, data, metadata)"
            ),
            // The fast path's statements. Its first statement advances the
            // head by the batch's size (which locks the row until commit) and
            // returns where it stood; the inserts then place their rows
            // relative to the head row as this transaction now sees it:
            // event k of n at `last_position - n + k`, the j-th new stream
            // (numbered `$base + j` in the plan) at `last_stream_no - m + j`.
            advance_head: format!(
                "WITH h AS (UPDATE {s}.head SET last_position = last_position + $1,
                                                last_stream_no = last_stream_no + $2
                            RETURNING last_position, last_stream_no)
                 SELECT last_position - $1, last_stream_no - $2, pg_notify($3, last_position::text)
                 FROM h"
            ),
            insert_streams_relative: format!(
                "INSERT INTO {s}.streams (stream_no, stream_id, category)
                 SELECT h.last_stream_no - $5 + (u.stream_no - $4), u.stream_id, u.category
                 FROM {s}.head h, unnest($1::bigint[], $2::text[], $3::text[])
                      AS u(stream_no, stream_id, category)"
            ),
            insert_events_relative: format!(
                "INSERT INTO {s}.events
                     (position, stream_no, version, category, event_id, event_type, data, metadata, recorded_at)
                 SELECT h.last_position - $11 + u.position,
                        CASE WHEN u.stream_no < 0 THEN h.last_stream_no - $12 + (u.stream_no - $10)
                             ELSE u.stream_no END,
                        u.version, u.category, u.event_id, u.event_type, u.data::json, u.metadata::json, $9
                 FROM {s}.head h,
                      unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::uuid[],
                             $6::text[], $7::text[], $8::text[])
                      AS u(position, stream_no, version, category, event_id, event_type, data, metadata)"
            ),
            // The fast path for a batch small enough for one INSERT: head,
            // streams and events in one statement, run as a transaction of
            // its own (committed at the protocol's Sync). The sibling
            // statements all place their rows from what the head UPDATE
            // returns.
            append_in_one: format!(
                "WITH h AS (UPDATE {s}.head SET last_position = last_position + $11,
                                                last_stream_no = last_stream_no + $12
                            RETURNING last_position - $11 AS position_base,
                                      last_stream_no - $12 AS stream_base),
                      new_streams AS (
                          INSERT INTO {s}.streams (stream_no, stream_id, category)
                          SELECT h.stream_base + (u.stream_no - $10), u.stream_id, u.category
                          FROM h, unnest($13::bigint[], $14::text[], $15::text[])
                               AS u(stream_no, stream_id, category)),
                      new_events AS (
                          INSERT INTO {s}.events
                              (position, stream_no, version, category, event_id, event_type, data, metadata, recorded_at)
                          SELECT h.position_base + u.position,
                                 CASE WHEN u.stream_no < 0 THEN h.stream_base + (u.stream_no - $10)
                                      ELSE u.stream_no END,
                                 u.version, u.category, u.event_id, u.event_type, u.data::json,
                                 u.metadata::json, $9
                          FROM h, unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::uuid[],
                                         $6::text[], $7::text[], $8::text[])
                               AS u(position, stream_no, version, category, event_id, event_type, data, metadata))
                 SELECT position_base, stream_base, pg_notify($16, (position_base + $11)::text) FROM h"
            ),
            // Versions are dense, so a page of n events from version v is
            // the range [v, v + n): bounding it keeps the scan to the page
            // even under a plan that sorts (fresh tables have no stats).
            read_stream_forwards: format!(
                "{select} WHERE s.stream_id = $1 AND e.version >= $2 AND e.version < $4
                 ORDER BY e.version LIMIT $3"
            ),
            read_stream_backwards: format!(
                "{select} WHERE s.stream_id = $1 AND e.version <= $2 ORDER BY e.version DESC LIMIT $3"
            ),
            read_all: format!("{select} WHERE e.position >= $1 ORDER BY e.position LIMIT $2"),
            read_category: format!(
                "{select} WHERE e.category = $1 AND e.position >= $2 ORDER BY e.position LIMIT $3"
            ),
            // Within a stream, versions and positions rise together, so the
            // (stream_no, version) index serves position order too.
            read_one_stream: format!(
                "{select} WHERE s.stream_id = $1 AND e.position >= $2 ORDER BY e.version LIMIT $3"
            ),
            find_commands: format!(
                "SELECT key, fingerprint, stream_id, first_version, last_version, first_position,
                        last_position, event_ids, recorded_at
                 FROM {s}.commands WHERE key = ANY($1)"
            ),
            // Only expired records are ever replaced: the writer decided the
            // live ones under the head lock before planning.
            insert_commands: format!(
                "INSERT INTO {s}.commands (key, fingerprint, stream_id, first_version, last_version,
                                           first_position, last_position, event_ids, recorded_at)
                 SELECT u.key, u.fingerprint, u.stream_id, u.first_version, u.last_version,
                        u.first_position, u.last_position,
                        string_to_array(u.event_ids, ',')::uuid[], $8
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                             $6::bigint[], $7::bigint[], $9::text[])
                      AS u(key, fingerprint, stream_id, first_version, last_version,
                           first_position, last_position, event_ids)
                 ON CONFLICT (key) DO UPDATE SET
                     fingerprint = excluded.fingerprint, stream_id = excluded.stream_id,
                     first_version = excluded.first_version, last_version = excluded.last_version,
                     first_position = excluded.first_position,
                     last_position = excluded.last_position,
                     event_ids = excluded.event_ids, recorded_at = excluded.recorded_at"
            ),
            purge_commands: format!("DELETE FROM {s}.commands WHERE recorded_at < $1"),
            save_snapshot: format!(
                "INSERT INTO {s}.snapshots AS k (stream_id, version, snapshot_version, data, recorded_at)
                 VALUES ($1, $2, $3, $4::text::json, now())
                 ON CONFLICT (stream_id) DO UPDATE SET
                     version = excluded.version, snapshot_version = excluded.snapshot_version,
                     data = excluded.data, recorded_at = excluded.recorded_at
                 WHERE excluded.version >= k.version
                    OR excluded.snapshot_version <> k.snapshot_version"
            ),
            load_snapshot: format!(
                "SELECT version, snapshot_version, data::text, recorded_at
                 FROM {s}.snapshots WHERE stream_id = $1"
            ),
            // Channel names are identifiers, at most 63 bytes: hence the
            // 50-byte cap on schema names.
            channel: format!("factline_{schema}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked_before_use() {
        assert!(validate_schema_name("factline").is_ok());
        assert!(validate_schema_name("bench_2").is_ok());
        for bad in ["", "Factline", "a-b", "1x", "pg_x", "a\"b", &"x".repeat(51)] {
            assert!(validate_schema_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
