//! The inbox on PostgreSQL, in the consumer's database.

use super::quote_ident;
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// Creates `schema.inbox` if needed (the schema must exist).
pub async fn setup(client: &impl GenericClient, schema: &str) -> Result<(), tokio_postgres::Error> {
    let s = quote_ident(schema);
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {s}.inbox (
                 consumer     text        NOT NULL,
                 event_id     uuid        NOT NULL,
                 processed_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (consumer, event_id)
             );
             CREATE INDEX IF NOT EXISTS inbox_processed_at ON {s}.inbox (processed_at);"
        ))
        .await
}

/// Records `event_id` as processed by `consumer` inside the open
/// transaction `tx`; `false` when it already was.
pub async fn first_delivery(
    tx: &impl GenericClient,
    schema: &str,
    consumer: &str,
    event_id: Uuid,
) -> Result<bool, tokio_postgres::Error> {
    let s = quote_ident(schema);
    let inserted = tx
        .execute(
            &format!(
                "INSERT INTO {s}.inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            ),
            &[&consumer, &event_id],
        )
        .await?;
    Ok(inserted == 1)
}

/// Deletes inbox rows processed before `cutoff`; returns how many.
pub async fn purge(
    client: &impl GenericClient,
    schema: &str,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<u64, tokio_postgres::Error> {
    let s = quote_ident(schema);
    client
        .execute(
            &format!("DELETE FROM {s}.inbox WHERE processed_at < $1"),
            &[&cutoff],
        )
        .await
}
