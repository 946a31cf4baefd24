//! Reading declared read models in PostgreSQL: a small pool, each answer
//! one read-only repeatable-read transaction with the read model's
//! position; rows come back as JSON made by the server (`row_to_json`),
//! so every column type (numeric sums included) has its JSON form.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use factline_core::StorageError;
use serde_json::{Map, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::IsolationLevel;

use crate::query::{Answer, Plan, QueryError};

pub(crate) struct PostgresReader {
    pool: Pool,
    schema: String,
}

/// Connections kept for queries.
const POOL_SIZE: usize = 8;

fn failed(context: &str, e: tokio_postgres::Error) -> QueryError {
    QueryError::Storage(factline_postgres::sql::storage_error(context, e))
}

fn pool_failed(e: deadpool_postgres::PoolError) -> QueryError {
    QueryError::Storage(StorageError::with_source("connecting for a query", e))
}

/// A schema whose registry no runner has created yet has applied nothing.
fn not_created_yet(
    position: Result<Option<u64>, tokio_postgres::Error>,
) -> Result<Option<u64>, tokio_postgres::Error> {
    match position {
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(None),
        other => other,
    }
}

impl PostgresReader {
    pub fn new(url: &str, schema: &str) -> Result<Self, QueryError> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| {
            QueryError::Storage(StorageError::with_source(
                "invalid PostgreSQL connection string",
                e,
            ))
        })?;
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| {
                QueryError::Storage(StorageError::with_source("building the query pool", e))
            })?;
        Ok(PostgresReader {
            pool,
            schema: schema.to_owned(),
        })
    }

    pub async fn position(&self, name: &str) -> Result<u64, QueryError> {
        let client = self.pool.get().await.map_err(pool_failed)?;
        let position =
            factline_projections::postgres::active_position(&**client, &self.schema, name).await;
        Ok(not_created_yet(position)
            .map_err(|e| failed("reading the read model's position", e))?
            .unwrap_or(0))
    }

    pub async fn run(&self, plan: Plan) -> Result<Answer, QueryError> {
        let mut client = self.pool.get().await.map_err(pool_failed)?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| failed("starting a read", e))?;
        // A query never holds a connection for long.
        tx.batch_execute("SET LOCAL statement_timeout = '10s'")
            .await
            .map_err(|e| failed("starting a read", e))?;
        let position =
            factline_projections::postgres::active_position(&*tx, &self.schema, &plan.read_model)
                .await
                .map_err(|e| failed("reading the read model's position", e))?;
        let Some(position) = position else {
            return Ok(plan.answer(Vec::new(), 0));
        };
        let sql = plan.sql_for(&format!("\"{}\".", self.schema), "row_to_json(q)::text");
        let params: Vec<&(dyn ToSql + Sync)> = plan
            .params
            .iter()
            .map(|p| p as &(dyn ToSql + Sync))
            .collect();
        let rows = tx
            .query(&sql, &params)
            .await
            .map_err(|e| failed("querying the read model", e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let text: String = row.get(0);
            let object: Map<String, Value> = serde_json::from_str(&text).map_err(|e| {
                QueryError::Storage(StorageError::with_source("reading a row's JSON", e))
            })?;
            out.push(object);
        }
        tx.commit().await.map_err(|e| failed("ending a read", e))?;
        Ok(plan.answer(out, position))
    }
}
