//! The admin API (X2): projections and the outbox.
//!
//! The server holds no projection's code: listing, pausing, rebuilding and
//! handling parked events go through [`ProjectionsAdmin`], which the
//! binary that runs the projections implements.

use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use factline_outbox::OutboxStatus;
use factline_projections::{ParkedEvent, RetryReport, VersionInfo};
use serde::Serialize;
use serde_json::{json, Value};

use crate::guard::JsonWrite;
use crate::{AdminError, ApiError, Authenticated, Shared};

/// One projection as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProjectionView {
    /// The projection's name.
    pub name: String,
    /// `running`, `paused`, `rebuilding`, `stopped` (no runner in this
    /// process) or `failed`.
    pub state: ProjectionState,
    /// The version readers see; `None` before its first batch.
    pub active_version: Option<u32>,
    /// The active version's checkpoint.
    pub checkpoint: u64,
    /// Events committed and not yet applied.
    pub lag_events: u64,
    /// How old the first unapplied event is; 0 when caught up.
    pub lag_seconds: f64,
    /// Events parked in the dead-letter table.
    pub parked: u64,
    /// Events an operator skipped.
    pub skipped: u64,
    /// Every version with a checkpoint.
    pub versions: Vec<VersionInfo>,
    /// The rebuild in progress, if one is.
    pub rebuild: Option<RebuildView>,
    /// Why a failed runner stopped.
    pub error: Option<String>,
}

/// What a projection is doing, as the admin API and dashboard show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ProjectionState {
    /// A runner in this process applies its events.
    Running,
    /// An operator paused it: no batch commits until it is resumed.
    Paused,
    /// A new version is being built beside the active one.
    Rebuilding,
    /// No runner in this process (another process, or the service that
    /// has its code, may run it).
    Stopped,
    /// This process's runner stopped on an error.
    Failed,
}

/// Where a rebuild started through the admin API is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum RebuildState {
    /// Catching up with the log.
    Running,
    /// Done: the new version is the active one.
    Swapped,
    /// Stopped on an error; the active version is unchanged.
    Failed,
}

/// How far a rebuild has come.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RebuildView {
    /// The version being built.
    pub version: u32,
    /// `running`, `swapped` or `failed`.
    pub state: RebuildState,
    /// Events applied so far.
    pub done: u64,
    /// Events to apply in all.
    pub total: u64,
    /// Events applied per second so far.
    pub events_per_second: f64,
    /// Seconds left at that rate, once it is known.
    pub eta_seconds: Option<f64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// What the admin API does to projections.
#[async_trait]
pub trait ProjectionsAdmin: Send + Sync {
    /// Every projection, with its lag behind `head`.
    async fn list(&self, head: u64) -> Result<Vec<ProjectionView>, AdminError>;
    /// Pauses (`true`) or resumes a projection in every process that runs it.
    async fn set_paused(&self, name: &str, paused: bool) -> Result<(), AdminError>;
    /// Starts a rebuild in the background; its progress shows in
    /// [`ProjectionView::rebuild`].
    async fn rebuild(&self, name: &str) -> Result<RebuildView, AdminError>;
    /// The parked events of a projection, oldest first.
    async fn parked(&self, name: &str) -> Result<Vec<ParkedEvent>, AdminError>;
    /// Applies the parked events of a projection again.
    async fn retry(&self, name: &str) -> Result<RetryReport, AdminError>;
    /// Gives up on one parked event; false when there is none at `position`.
    async fn skip(&self, name: &str, position: u64) -> Result<bool, AdminError>;
}

/// One panel of a domain's read model on the dashboard: a named query's
/// rows and how to draw them.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PanelView {
    /// The read model whose query it draws.
    pub read_model: String,
    /// Its heading.
    pub title: String,
    /// The named query.
    pub query: String,
    /// `number`, `table`, `bar`, `stacked_bars_per_day` or `line`.
    pub chart: String,
    /// The column of labels, days or times.
    pub x: Option<String>,
    /// The column of values.
    pub y: Option<String>,
    /// The column that splits values into series.
    pub series: Option<String>,
    /// The columns a table shows (all when empty).
    pub columns: Vec<String>,
    /// Columns holding cents.
    pub cents: Vec<String>,
    /// The query's rows.
    pub rows: Vec<Value>,
    /// The position the read model had reached when they were read.
    pub position: u64,
    /// Why the rows could not be read, if they could not.
    pub error: Option<String>,
}

impl PanelView {
    /// A panel of `read_model` drawing `query` as `chart`, with no rows yet.
    pub fn new(read_model: String, title: String, query: String, chart: String) -> Self {
        PanelView {
            read_model,
            title,
            query,
            chart,
            x: None,
            y: None,
            series: None,
            columns: Vec::new(),
            cents: Vec::new(),
            rows: Vec::new(),
            position: 0,
            error: None,
        }
    }

    /// With the columns it draws.
    pub fn drawing(
        mut self,
        x: Option<String>,
        y: Option<String>,
        series: Option<String>,
        columns: Vec<String>,
        cents: Vec<String>,
    ) -> Self {
        (self.x, self.y, self.series, self.columns, self.cents) = (x, y, series, columns, cents);
        self
    }

    /// With its rows, or why they could not be read.
    pub fn with_rows(mut self, rows: Result<(Vec<Value>, u64), String>) -> Self {
        match rows {
            Ok((rows, position)) => (self.rows, self.position) = (rows, position),
            Err(e) => self.error = Some(e),
        }
        self
    }
}

/// The panels of the domains' read models the dashboard draws.
#[async_trait]
pub trait DashboardData: Send + Sync {
    /// Every panel with its rows; none when no read model declares any
    /// (the page then shows only what every store has).
    async fn panels(&self) -> Result<Vec<PanelView>, AdminError>;
}

fn projections_of(state: &Shared) -> Result<&dyn ProjectionsAdmin, ApiError> {
    state
        .projections
        .as_deref()
        .ok_or_else(|| ApiError::NotFound("this server runs no projections".into()))
}

async fn find(state: &Shared, name: &str) -> Result<ProjectionView, ApiError> {
    let head = state.store.head_position().await?;
    projections_of(state)?
        .list(head)
        .await?
        .into_iter()
        .find(|v| v.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("there is no projection {name:?}")))
}

pub async fn projections(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Value>, ApiError> {
    caller.may_administer()?;
    let head = state.store.head_position().await?;
    let views = projections_of(&state)?.list(head).await?;
    Ok(Json(json!({ "head_position": head, "projections": views })))
}

pub async fn projection(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    Path(name): Path<String>,
) -> Result<Json<ProjectionView>, ApiError> {
    caller.may_administer()?;
    Ok(Json(find(&state, &name).await?))
}

pub async fn rebuild(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    _: JsonWrite,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.may_administer()?;
    find(&state, &name).await?;
    let started = projections_of(&state)?.rebuild(&name).await?;
    tracing::info!(projection = %name, version = started.version, caller = caller.name(), "rebuild started");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "projection": name, "rebuild": started })),
    ))
}

async fn set_paused(
    state: &Shared,
    caller: &crate::Caller,
    name: &str,
    paused: bool,
) -> Result<Json<ProjectionView>, ApiError> {
    caller.may_administer()?;
    find(state, name).await?;
    projections_of(state)?.set_paused(name, paused).await?;
    tracing::info!(projection = %name, paused, caller = caller.name(), "projection paused or resumed");
    Ok(Json(find(state, name).await?))
}

pub async fn pause(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    _: JsonWrite,
    Path(name): Path<String>,
) -> Result<Json<ProjectionView>, ApiError> {
    set_paused(&state, &caller, &name, true).await
}

pub async fn resume(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    _: JsonWrite,
    Path(name): Path<String>,
) -> Result<Json<ProjectionView>, ApiError> {
    set_paused(&state, &caller, &name, false).await
}

pub async fn parked(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.may_administer()?;
    find(&state, &name).await?;
    let parked = projections_of(&state)?.parked(&name).await?;
    Ok(Json(json!({ "projection": name, "parked": parked })))
}

pub async fn retry_parked(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    _: JsonWrite,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.may_administer()?;
    find(&state, &name).await?;
    let report = projections_of(&state)?.retry(&name).await?;
    Ok(Json(json!({
        "projection": name,
        "applied": report.applied,
        "still_parked": report.still_parked,
    })))
}

pub async fn skip_parked(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    _: JsonWrite,
    Path((name, position)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.may_administer()?;
    let position: u64 = position
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{position:?} is not a global position")))?;
    find(&state, &name).await?;
    if !projections_of(&state)?.skip(&name, position).await? {
        return Err(ApiError::NotFound(format!(
            "projection {name} has no parked event at position {position}"
        )));
    }
    Ok(Json(json!({ "projection": name, "skipped": position })))
}

pub async fn outbox(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
) -> Result<Json<OutboxStatus>, ApiError> {
    caller.may_administer()?;
    let outbox = state.outbox.as_ref().ok_or_else(|| {
        ApiError::NotFound("this server has no outbox (an in-memory store keeps none)".into())
    })?;
    let status = outbox
        .status()
        .await
        .map_err(|e| ApiError::Internal(format!("the outbox did not answer: {e}")))?;
    Ok(Json(status))
}
