//! The registry, checkpoint and lease tables of PostgreSQL and the statements
//! on them.

use super::*;

/// The active version, with its registry row locked exclusively until the
/// transaction ends, so a swap or discard and a batch of the old version
/// cannot interleave. (Batches take the row shared, with a prepared
/// statement of their own: partitions of one projection may commit side by
/// side.)
pub(super) async fn lock_active(
    tx: &Transaction<'_>,
    versions: &str,
    name: &str,
) -> Result<Option<Active>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            &format!("SELECT active_version, tables FROM {versions} WHERE name = $1 FOR UPDATE"),
            &[&name],
        )
        .await?;
    Ok(row.map(|r| Active::parse(i64::from(r.get::<_, i32>(0)), r.get(1))))
}

pub(super) async fn register(
    tx: &(impl tokio_postgres::GenericClient + Sync),
    versions: &str,
    name: &str,
    tables: &Tables,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        &format!(
            "INSERT INTO {versions} (name, active_version, tables, swapped_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (name) DO UPDATE SET active_version = excluded.active_version,
                 tables = excluded.tables, swapped_at = excluded.swapped_at"
        ),
        &[
            &name,
            &(tables.version() as i32),
            &Active::tables_text(tables.logical()),
        ],
    )
    .await
    .map(|_| ())
}

pub(super) fn failure(name: &str, context: &str, e: tokio_postgres::Error) -> ProjectionError {
    if is_transient(&e) {
        return ProjectionError::Transient {
            projection: name.to_owned(),
            message: format!("{context}: {}", describe(&e)),
        };
    }
    ProjectionError::read_model(name, factline_postgres::sql::storage_error(context, e))
}

pub(crate) use factline_postgres::sql::describe;
/// A deadlock or serialization failure: the server aborted the
/// transaction, and the same one may succeed when run again.
pub(crate) use factline_postgres::sql::is_aborted_by_server as is_transient;

/// The checkpoint rows of one version (`$1`, its unpartitioned key): one,
/// or one per partition.
pub(super) const VERSION_CHECKPOINTS: &str = "(name = $1 OR starts_with(name, $1 || '#'))";

/// A projection's refusal of an event; a deadlock or serialization
/// failure behind it is no refusal and is run again.
pub(super) fn refused(name: &str, position: u64, refusal: ApplyError) -> ProjectionError {
    let projection = name.to_owned();
    match refusal.is_transient() {
        true => ProjectionError::Transient {
            projection,
            message: refusal.into_message(),
        },
        false => ProjectionError::Apply {
            projection,
            position,
            message: refusal.into_message(),
        },
    }
}

/// How often a batch the server aborted (deadlock, serialization failure)
/// is run again before the runner is told.
pub(super) const TRANSIENT_ATTEMPTS: u32 = 8;

pub(super) fn save_checkpoint_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (name, position, updated_at) VALUES ($1, $2, now())
         ON CONFLICT (name) DO UPDATE SET position = excluded.position,
                                          updated_at = excluded.updated_at"
    )
}

/// Moves a checkpoint only from where the sink last saw it (`$3`), so two
/// runners of one projection can never both apply a batch: the second
/// waits on the row (or on the first's insert) and then finds it moved.
pub(super) fn move_checkpoint_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} AS c (name, position, updated_at) VALUES ($1, $2, now())
         ON CONFLICT (name) DO UPDATE SET position = excluded.position,
                                          updated_at = excluded.updated_at
         WHERE c.position = $3"
    )
}

/// The tables every read-model schema has: checkpoints, parked events,
/// versions and controls.
/// The read models' component name in `factline_migrations`.
pub(super) const READ_MODELS: &str = "read_models";

/// The read models' migrations (`{s}`: the quoted schema): the registry,
/// checkpoints, parked events and controls.
pub(super) const READ_MODEL_MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {s}.projection_checkpoints (
         name       text        PRIMARY KEY,
         position   bigint      NOT NULL,
         updated_at timestamptz NOT NULL
     );
     CREATE TABLE IF NOT EXISTS {s}.projection_parked_events (
         projection text        NOT NULL,
         version    integer     NOT NULL,
         position   bigint      NOT NULL,
         stream_id  text        NOT NULL,
         event_id   text        NOT NULL,
         event_type text        NOT NULL,
         error      text        NOT NULL,
         attempts   integer     NOT NULL,
         state      text        NOT NULL,
         parked_at  timestamptz NOT NULL,
         PRIMARY KEY (projection, version, position)
     );
     CREATE TABLE IF NOT EXISTS {s}.projection_versions (
         name           text        PRIMARY KEY,
         active_version integer     NOT NULL,
         tables         text        NOT NULL,
         swapped_at     timestamptz NOT NULL
     );
     CREATE TABLE IF NOT EXISTS {s}.projection_controls (
         name       text        PRIMARY KEY,
         paused     boolean     NOT NULL,
         updated_at timestamptz NOT NULL
     );",
    // 2: the definition each version of a declared read model was built
    // from.
    "CREATE TABLE IF NOT EXISTS {s}.projection_definitions (
         name        text        NOT NULL,
         version     integer     NOT NULL,
         fingerprint text        NOT NULL,
         recorded_at timestamptz NOT NULL,
         PRIMARY KEY (name, version)
     );",
];

/// Records the definition `version` of `name` is built from, or refuses
/// one that differs from the recorded one.
pub(super) async fn check_definition(
    client: &Client,
    schema: &str,
    name: &str,
    version: u32,
    fingerprint: &str,
) -> Result<(), ProjectionError> {
    let table = format!("\"{schema}\".projection_definitions");
    let failed = |e| failure(name, "recording the read model's definition", e);
    client
        .execute(
            &format!(
                "INSERT INTO {table} (name, version, fingerprint, recorded_at)
                 VALUES ($1, $2, $3, now()) ON CONFLICT (name, version) DO NOTHING"
            ),
            &[&name, &(version as i32), &fingerprint],
        )
        .await
        .map_err(failed)?;
    let stored: String = client
        .query_one(
            &format!("SELECT fingerprint FROM {table} WHERE name = $1 AND version = $2"),
            &[&name, &(version as i32)],
        )
        .await
        .map_err(failed)?
        .get(0);
    if stored != fingerprint {
        return Err(crate::tables::changed_definition(
            name,
            version,
            &stored,
            fingerprint,
        ));
    }
    Ok(())
}

/// Forgets the definition of a dropped version.
pub(super) fn forget_definition_sql(schema: &str) -> String {
    format!("DELETE FROM \"{schema}\".projection_definitions WHERE name = $1 AND version = $2")
}

/// A connection named after `name`, with `<schema>.projection_checkpoints`
/// created if missing; returns the client and the table's quoted name.
pub(super) async fn connect_with_checkpoints(
    url: &str,
    schema: &str,
    name: &str,
) -> Result<(Client, String), ProjectionError> {
    let failed = |message: String| ProjectionError::read_model(name, StorageError::new(message));
    let schema_ok = !schema.is_empty()
        && schema.len() <= 50
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with(|c: char| c.is_ascii_digit());
    if !schema_ok {
        return Err(ProjectionError::invalid(
            name,
            format!("schema name {schema:?} must be 1 to 50 lower-case letters, digits or _"),
        ));
    }
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| failed(format!("invalid PostgreSQL connection string: {e}")))?;
    config.application_name(format!("factline projection {name}"));
    let (mut client, connection) = config.connect(NoTls).await.map_err(|e| {
        ProjectionError::read_model(
            name,
            factline_postgres::sql::storage_error("connecting the read model", e),
        )
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "projection connection ended");
        }
    });
    let checkpoints = format!("\"{schema}\".projection_checkpoints");
    // Runners starting at once migrate under one lock: one creates.
    factline_postgres::migrate::apply(&mut client, schema, READ_MODELS, READ_MODEL_MIGRATIONS)
        .await
        .map_err(|e| ProjectionError::read_model(name, e))?;
    Ok((client, checkpoints))
}
