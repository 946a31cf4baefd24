//! The read-model query API (issue 24): `GET /read-models`, a table's rows
//! with filters, order and cursor, named queries, and read-your-writes
//! through `min_position`.
//!
//! The server holds no read model's definition or database client: the
//! binary that runs the read models implements [`ReadModelsApi`].

use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use crate::{ApiError, Authenticated, ProjectionState, Shared};

/// One declared read model as `GET /read-models` lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ReadModelView {
    /// Its name.
    pub name: String,
    /// The version of its definition this server runs.
    pub version: u32,
    /// The position its active version has reached.
    pub checkpoint: u64,
    /// Events committed and not yet applied.
    pub lag_events: u64,
    /// How old the first unapplied event is; 0 when caught up.
    pub lag_seconds: f64,
    /// What its runner in this process is doing.
    pub state: ProjectionState,
}

impl ReadModelView {
    /// A view of `name` at `version`.
    pub fn new(name: String, version: u32, state: ProjectionState) -> Self {
        ReadModelView {
            name,
            version,
            checkpoint: 0,
            lag_events: 0,
            lag_seconds: 0.0,
            state,
        }
    }

    /// With its progress.
    pub fn with_progress(mut self, checkpoint: u64, lag_events: u64, lag_seconds: f64) -> Self {
        (self.checkpoint, self.lag_events, self.lag_seconds) =
            (checkpoint, lag_events, lag_seconds);
        self
    }
}

/// Rows and the position they reflect.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct QueryAnswer {
    /// Each row, a JSON object.
    pub rows: Vec<Value>,
    /// The position the read model had reached when the rows were read.
    pub position: u64,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
}

impl QueryAnswer {
    /// An answer.
    pub fn new(rows: Vec<Value>, position: u64, next: Option<String>) -> Self {
        QueryAnswer {
            rows,
            position,
            next,
        }
    }
}

/// Why a read-model request has no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadModelError {
    /// 404: no read model, table or query by that name.
    #[error("{0}")]
    NotFound(String),
    /// 400: the request does not fit (a column, a type, a limit, a cursor).
    #[error("{0}")]
    Invalid(String),
    /// 500: the read model's database failed.
    #[error("{0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<ReadModelError> for ApiError {
    fn from(e: ReadModelError) -> Self {
        match e {
            ReadModelError::NotFound(m) => ApiError::NotFound(m),
            ReadModelError::Invalid(m) => ApiError::BadRequest(m),
            ReadModelError::Failed(e) => ApiError::from(crate::AdminError::Failed(e)),
        }
    }
}

/// The read models a server answers queries on.
#[async_trait]
pub trait ReadModelsApi: Send + Sync {
    /// The declared read models, with their progress against `head`.
    async fn list(&self, head: u64) -> Result<Vec<ReadModelView>, ReadModelError>;
    /// Rows of `table` of `read_model`; `params` are the request's query
    /// parameters (filters, `order`, `limit`, `cursor`).
    async fn table(
        &self,
        read_model: &str,
        table: &str,
        params: &[(String, String)],
    ) -> Result<QueryAnswer, ReadModelError>;
    /// Rows of the named query `query` of `read_model`, with its
    /// parameters.
    async fn query(
        &self,
        read_model: &str,
        query: &str,
        params: &[(String, String)],
    ) -> Result<QueryAnswer, ReadModelError>;
    /// The position `read_model` has reached.
    async fn position(&self, read_model: &str) -> Result<u64, ReadModelError>;
    /// Whether a request of `target` would be answered (the names exist,
    /// the parameters fit), without reading: checked before a read waits
    /// for `min_position`, so a mistake is answered at once.
    async fn check(
        &self,
        read_model: &str,
        target: Target<'_>,
        params: &[(String, String)],
    ) -> Result<(), ReadModelError>;
}

/// What a read-model request reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target<'a> {
    /// A table.
    Table(&'a str),
    /// A named query.
    Query(&'a str),
}

/// How long a read waits for `min_position` unless told (`timeout_ms`).
const DEFAULT_WAIT: Duration = Duration::from_secs(5);
/// The longest wait a read may ask for: well within the request timeout
/// (30 s by default) and a client's.
const MAX_WAIT: Duration = Duration::from_secs(15);
/// How often a waiting read looks at the read model's position.
const WAIT_POLL: Duration = Duration::from_millis(10);

fn api(state: &Shared) -> Result<&dyn ReadModelsApi, ApiError> {
    state.read_models.as_deref().ok_or_else(|| {
        ApiError::NotFound(
            "this server runs no declared read models (start it with --read-models FILE)".into(),
        )
    })
}

fn number(params: &[(String, String)], name: &str) -> Result<Option<u64>, ApiError> {
    match params.iter().find(|(n, _)| n == name) {
        None => Ok(None),
        Some((_, v)) => v.parse::<u64>().map(Some).map_err(|_| {
            ApiError::bad_request(format!("{name} must be a whole number, not {v:?}"))
        }),
    }
}

/// Waits until `read_model` has reached `min_position` (if asked), within
/// `timeout_ms` (5 s by default).
async fn wait_for(
    api: &dyn ReadModelsApi,
    read_model: &str,
    params: &[(String, String)],
) -> Result<(), ApiError> {
    let Some(wanted) = number(params, "min_position")? else {
        return Ok(());
    };
    let wait = match number(params, "timeout_ms")? {
        Some(ms) if Duration::from_millis(ms) <= MAX_WAIT => Duration::from_millis(ms),
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "timeout_ms must be at most {}",
                MAX_WAIT.as_millis()
            )))
        }
        None => DEFAULT_WAIT,
    };
    let deadline = Instant::now() + wait;
    loop {
        let position = api.position(read_model).await?;
        if position >= wanted {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ApiError::NotCaughtUp {
                read_model: read_model.to_owned(),
                position,
                wanted,
            });
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// `GET /read-models`: the declared read models the caller may query.
pub(crate) async fn list(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Value>, ApiError> {
    let api = api(&state)?;
    let head = state.store.head_position().await?;
    let views: Vec<ReadModelView> = api
        .list(head)
        .await?
        .into_iter()
        .filter(|v| caller.can_query(&v.name))
        .collect();
    Ok(Json(json!({ "read_models": views })))
}

/// `GET /read-models/{name}/tables/{table}`.
pub(crate) async fn table(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    Path((name, table)): Path<(String, String)>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<QueryAnswer>, ApiError> {
    caller.may_query(&name)?;
    let api = api(&state)?;
    api.check(&name, Target::Table(&table), &params).await?;
    wait_for(api, &name, &params).await?;
    Ok(Json(api.table(&name, &table, &params).await?))
}

/// `GET /read-models/{name}/queries/{query}`.
pub(crate) async fn query(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    Path((name, query)): Path<(String, String)>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<QueryAnswer>, ApiError> {
    caller.may_query(&name)?;
    let api = api(&state)?;
    api.check(&name, Target::Query(&query), &params).await?;
    wait_for(api, &name, &params).await?;
    Ok(Json(api.query(&name, &query, &params).await?))
}
