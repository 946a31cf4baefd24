//! The one migration mechanism of every table factline keeps in a
//! PostgreSQL schema: the store's, the read models' registry and
//! checkpoints, the outbox's. Each component has numbered migrations
//! (`{s}` stands for the quoted schema), applied in order and recorded in
//! `{schema}.factline_migrations`, all under one advisory lock per schema,
//! so processes starting at once migrate it once. A migration is never
//! edited once released; a change is a new one.

use factline_core::StorageError;
use tokio_postgres::{Client, GenericClient};

use crate::sql::{quote_ident, storage_error};

/// Brings `component` of `schema` (created if missing) up to
/// `migrations.len()` in a transaction of its own. Fails, changing
/// nothing, when the schema holds a newer version of the component than
/// this build knows.
pub async fn apply(
    client: &mut Client,
    schema: &str,
    component: &str,
    migrations: &[&str],
) -> Result<(), StorageError> {
    // Up to date (the usual case): a read says so, without the lock every
    // starting process would otherwise queue on.
    if version_in(&*client, schema, component)
        .await
        .is_ok_and(|v| v == migrations.len() as i64)
    {
        return Ok(());
    }
    let tx = client
        .transaction()
        .await
        .map_err(|e| storage_error("migrating the schema", e))?;
    apply_in(&tx, schema, component, migrations).await?;
    tx.commit()
        .await
        .map_err(|e| storage_error("migrating the schema", e))
}

/// [`apply`] inside a transaction the caller holds (and commits) on
/// `tx`, a `Transaction` or a `Client` with a transaction open.
pub async fn apply_in<C: GenericClient + Sync>(
    tx: &C,
    schema: &str,
    component: &str,
    migrations: &[&str],
) -> Result<(), StorageError> {
    let failed = |e| storage_error("migrating the schema", e);
    lock_and_prepare(tx, schema).await.map_err(failed)?;
    let s = quote_ident(schema);
    let current = version_in(tx, schema, component).await.map_err(failed)?;
    let known = migrations.len() as i64;
    if current > known {
        return Err(StorageError::new(format!(
            "the {component} tables of schema {schema:?} are at version {current}, newer than this build's {known}; upgrade factline"
        )));
    }
    for (index, migration) in migrations.iter().enumerate().skip(current as usize) {
        tx.batch_execute(&migration.replace("{s}", &s))
            .await
            .map_err(failed)?;
        tx.execute(
            &format!("INSERT INTO {s}.factline_migrations (component, version) VALUES ($1, $2)"),
            &[&component, &(index as i32 + 1)],
        )
        .await
        .map_err(failed)?;
    }
    Ok(())
}

/// Takes the schema's migration lock (until the transaction ends) and
/// makes sure the schema and its migrations table exist.
pub async fn lock_and_prepare<C: GenericClient + Sync>(
    tx: &C,
    schema: &str,
) -> Result<(), tokio_postgres::Error> {
    let s = quote_ident(schema);
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("factline-migrate:{schema}")],
    )
    .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.factline_migrations (
             component  text        NOT NULL,
             version    integer     NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (component, version)
         );"
    ))
    .await
}

/// The version `component` is at in `schema`: the last migration recorded.
pub async fn version_in<C: GenericClient + Sync>(
    tx: &C,
    schema: &str,
    component: &str,
) -> Result<i64, tokio_postgres::Error> {
    let s = quote_ident(schema);
    let row = tx
        .query_one(
            &format!(
                "SELECT coalesce(max(version), 0)::bigint FROM {s}.factline_migrations WHERE component = $1"
            ),
            &[&component],
        )
        .await?;
    Ok(row.get(0))
}

/// Records `component` as being at `version` without running anything: for
/// tables an earlier build created and tracked otherwise.
pub async fn adopt<C: GenericClient + Sync>(
    tx: &C,
    schema: &str,
    component: &str,
    version: i64,
) -> Result<(), tokio_postgres::Error> {
    let s = quote_ident(schema);
    tx.execute(
        &format!(
            "INSERT INTO {s}.factline_migrations (component, version)
             SELECT $1, v FROM generate_series(1, $2::integer) v ON CONFLICT DO NOTHING"
        ),
        &[&component, &(version as i32)],
    )
    .await
    .map(|_| ())
}
