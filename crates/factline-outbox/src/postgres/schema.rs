//! The outbox's tables and trigger, created when the outbox opens.

use crate::{OutboxError, LANES};

pub(super) async fn pg_connect(
    url: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), OutboxError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "the outbox's database connection ended");
        }
    });
    Ok((client, connection))
}

pub(super) fn postgres_tables(s: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {s}.outbox_publications (
             id         bigserial   PRIMARY KEY,
             category   text,
             event_type text,
             subject    text        NOT NULL,
             key        text        NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now()
         );
         CREATE TABLE IF NOT EXISTS {s}.outbox (
             position     bigint      PRIMARY KEY,
             stream_no    bigint      NOT NULL,
             lane         integer     NOT NULL,
             publication  bigint      NOT NULL,
             created_at   timestamptz NOT NULL,
             published_at timestamptz,
             attempts     integer     NOT NULL DEFAULT 0,
             last_error   text
         );
         -- Published records leave the outbox for this log, one row per
         -- mark: deleting a record and appending one row per batch costs
         -- the database less than updating every record, and retention
         -- then deletes a few rows instead of many records.
         CREATE TABLE IF NOT EXISTS {s}.outbox_done (
             id           bigserial   PRIMARY KEY,
             positions    bigint[]    NOT NULL,
             published_at timestamptz NOT NULL
         );
         CREATE INDEX IF NOT EXISTS outbox_done_at ON {s}.outbox_done (published_at);
         -- Records marked by an earlier version, moved once.
         WITH moved AS (DELETE FROM {s}.outbox WHERE published_at IS NOT NULL
                        RETURNING position, published_at)
         INSERT INTO {s}.outbox_done (positions, published_at)
         SELECT array_agg(position ORDER BY position), date_trunc('second', published_at)
         FROM moved GROUP BY 2;
         CREATE TABLE IF NOT EXISTS {s}.outbox_lanes (
             lane       integer     PRIMARY KEY,
             holder     text,
             expires_at timestamptz NOT NULL DEFAULT 'epoch'
         );
         INSERT INTO {s}.outbox_lanes (lane) SELECT generate_series(0, {last}) ON CONFLICT DO NOTHING;
         CREATE TABLE IF NOT EXISTS {s}.outbox_relays (
             relay   text        PRIMARY KEY,
             seen_at timestamptz NOT NULL
         );
         -- One statement's new events, in one INSERT: appends write events
         -- in a few set-based statements, so the trigger runs per statement.
         CREATE OR REPLACE FUNCTION {s}.outbox_capture() RETURNS trigger LANGUAGE plpgsql AS $body$
         BEGIN
             INSERT INTO {s}.outbox (position, stream_no, lane, publication, created_at)
             SELECT n.position, n.stream_no, (n.stream_no % {LANES})::integer, p.id, n.recorded_at
             FROM new_events n
             CROSS JOIN LATERAL (
                 SELECT id FROM {s}.outbox_publications p
                 WHERE (p.category IS NULL OR p.category = n.category)
                   AND (p.event_type IS NULL OR p.event_type = n.event_type)
                 ORDER BY p.id LIMIT 1) p;
             RETURN NULL;
         END
         $body$;",
        last = LANES - 1
    )
}

/// Lane checkpoints, added to the tables above (and to those of earlier
/// versions): `upto` is the position at or below which every record of
/// the lane is published. Marking a batch then updates a few lane rows
/// instead of every record, and records under the checkpoint stay in
/// the outbox until retention. Positions come in commit order without
/// holes, so a relay that fetched and was acknowledged everything of a
/// lane up to a position knows nothing below it can still turn up.
pub(super) fn postgres_checkpoints(s: &str) -> String {
    format!(
        "ALTER TABLE {s}.outbox_lanes ADD COLUMN IF NOT EXISTS upto bigint NOT NULL DEFAULT 0;
         -- One row per mark that moved checkpoints: retention finds what
         -- was published before its cutoff here.
         CREATE TABLE IF NOT EXISTS {s}.outbox_marks (
             id           bigserial   PRIMARY KEY,
             lanes        integer[]   NOT NULL,
             uptos        bigint[]    NOT NULL,
             published_at timestamptz NOT NULL
         );
         CREATE INDEX IF NOT EXISTS outbox_marks_at ON {s}.outbox_marks (published_at);
         CREATE INDEX IF NOT EXISTS outbox_lane_position ON {s}.outbox (lane, position);
         -- Every record in the outbox is unpublished or under a checkpoint:
         -- these indexes of the mark-in-place days only cost the appends.
         DROP INDEX IF EXISTS {s}.outbox_unpublished;
         DROP INDEX IF EXISTS {s}.outbox_published;"
    )
}

/// The outbox's component name in `factline_migrations`.
pub(super) const COMPONENT: &str = "outbox";

/// The outbox's migrations, in order (`{s}`: the quoted schema): its
/// tables, the lane checkpoints that replaced marking records in place,
/// and the parked records.
pub(super) fn migrations() -> [String; 3] {
    [
        postgres_tables("{s}"),
        postgres_checkpoints("{s}"),
        "CREATE TABLE IF NOT EXISTS {s}.outbox_parked (
             position  bigint      PRIMARY KEY,
             error     text        NOT NULL,
             parked_at timestamptz NOT NULL DEFAULT now()
         );"
        .to_owned(),
    ]
}
