//! What the server's admin API and dashboard do with the projections of
//! the read-model database: list them with their lag, pause, resume and
//! handle parked events (any projection), and run live and rebuild in the
//! background those this process can run (see [`Catalog`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use factline::EventStore;
use factline_projections::{ParkedEvent, ProjectionStatus, RetryReport};
use factline_read_models::{Answer, QueryError, Reader, TableRequest};
use factline_server::{
    AdminError, DashboardData, PanelView, ProjectionState, ProjectionView, ProjectionsAdmin,
    QueryAnswer, ReadModelError, ReadModelView, ReadModelsApi, RebuildState, RebuildView, Target,
};
use serde_json::Value;
use tokio::sync::watch;

use crate::catalog::{self, Catalog, ReadModelDb};
use crate::projections_cli::{self, RebuildArgs, ReportState};
use crate::UsageError;

/// How a live runner of this process is doing.
#[derive(Clone)]
struct Live {
    status: ProjectionStatus,
    /// Set when the runner ended: `Err` with why it failed.
    ended: Option<Result<(), String>>,
}

/// A rebuild started through the API.
#[derive(Clone)]
struct Rebuild {
    version: u32,
    statuses: Vec<ProjectionStatus>,
    /// `None` while it runs.
    outcome: Option<Result<(), String>>,
}

/// The projections of one read-model database, for the server.
pub struct CatalogAdmin {
    catalog: Catalog,
    db: ReadModelDb,
    store: Arc<dyn EventStore>,
    live: Arc<Mutex<HashMap<String, Live>>>,
    rebuilds: Arc<Mutex<HashMap<String, Rebuild>>>,
}

fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> AdminError {
    AdminError::failed(e)
}

/// A usage error (bad name, nothing to do) is a refusal; the rest failed.
fn classify(e: anyhow::Error) -> AdminError {
    if e.chain().any(|c| c.is::<UsageError>()) {
        AdminError::Refused(format!("{e:#}"))
    } else {
        AdminError::failed(e)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere poisons nothing this module cannot still read.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CatalogAdmin {
    pub fn new(catalog: Catalog, db: ReadModelDb, store: Arc<dyn EventStore>) -> Self {
        CatalogAdmin {
            catalog,
            db,
            store,
            live: Arc::default(),
            rebuilds: Arc::default(),
        }
    }

    /// Runs the projections called `names` live until `stop`; the
    /// returned tasks end after their runners stopped.
    pub fn start_live(
        &self,
        names: &[String],
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut tasks = Vec::new();
        for name in names {
            let name = name.clone();
            let (status, runner) =
                catalog::spawn_live(&self.catalog, &self.db, &self.store, &name, stop)?;
            lock(&self.live).insert(
                name.clone(),
                Live {
                    status,
                    ended: None,
                },
            );
            let live = self.live.clone();
            tasks.push(tokio::spawn(async move {
                let ended = match runner.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(format!("the runner task ended: {e}")),
                };
                if let Err(e) = &ended {
                    tracing::error!(projection = %name, error = %e, "projection stopped");
                }
                if let Some(entry) = lock(&live).get_mut(&name) {
                    entry.ended = Some(ended);
                }
            }));
        }
        Ok(tasks)
    }

    fn rebuild_view(&self, name: &str) -> Option<RebuildView> {
        let rebuild = lock(&self.rebuilds).get(name).cloned()?;
        let progress = projections_cli::slowest_progress(&rebuild.statuses);
        let (state, error) = match &rebuild.outcome {
            None => (RebuildState::Running, None),
            Some(Ok(())) => (RebuildState::Swapped, None),
            Some(Err(e)) => (RebuildState::Failed, Some(e.clone())),
        };
        Some(RebuildView {
            version: rebuild.version,
            state,
            done: progress.map_or(0, |p| p.done),
            total: progress.map_or(0, |p| p.total),
            events_per_second: progress.map_or(0.0, |p| p.events_per_second),
            eta_seconds: progress.and_then(|p| p.eta).map(|d| d.as_secs_f64()),
            error,
        })
    }
}

#[async_trait]
impl ProjectionsAdmin for CatalogAdmin {
    async fn list(&self, head: u64) -> Result<Vec<ProjectionView>, AdminError> {
        let admin = self.db.admin().await.map_err(failed)?;
        let infos = admin.projections().await.map_err(failed)?;
        let live = lock(&self.live).clone();
        let mut views = Vec::with_capacity(infos.len());
        for info in infos {
            let name = info.name.clone();
            let in_progress = projections_cli::candidate_in_progress(&info);
            let report = projections_cli::status_at(&self.store, info, head)
                .await
                .map_err(classify)?;
            let rebuild = self.rebuild_view(&name);
            let runner = live.get(&name);
            let error = runner.and_then(|l| l.ended.clone()).and_then(Result::err);
            let state = if rebuild
                .as_ref()
                .is_some_and(|r| r.state == RebuildState::Running)
            {
                ProjectionState::Rebuilding
            } else if report.state == ReportState::Paused {
                ProjectionState::Paused
            } else if error.is_some() {
                ProjectionState::Failed
            } else if runner.is_some_and(|l| l.ended.is_none()) {
                ProjectionState::Running
            } else if in_progress.is_some() {
                ProjectionState::Rebuilding
            } else {
                ProjectionState::Stopped
            };
            views.push(ProjectionView {
                name,
                state,
                active_version: report.active_version,
                checkpoint: report.checkpoint,
                lag_events: report.events_behind,
                lag_seconds: report.seconds_behind,
                parked: report.parked,
                skipped: report.skipped,
                versions: report.versions,
                rebuild,
                error,
            });
        }
        // Runners of this process that have not written a batch yet.
        for (name, l) in live {
            if !views.iter().any(|v| v.name == name) {
                views.push(ProjectionView {
                    name,
                    state: ProjectionState::Running,
                    active_version: None,
                    checkpoint: l.status.checkpoint(),
                    lag_events: head.saturating_sub(l.status.checkpoint()),
                    lag_seconds: 0.0,
                    parked: 0,
                    skipped: 0,
                    versions: Vec::new(),
                    rebuild: None,
                    error: None,
                });
            }
        }
        views.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(views)
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<(), AdminError> {
        let mut admin = self.db.admin().await.map_err(failed)?;
        admin.set_paused(name, paused).await.map_err(failed)
    }

    async fn rebuild(&self, name: &str) -> Result<RebuildView, AdminError> {
        self.catalog.find(name).map_err(classify)?;
        {
            // Checked and claimed under one lock, so two requests cannot
            // both start one.
            let mut rebuilds = lock(&self.rebuilds);
            if rebuilds.get(name).is_some_and(|r| r.outcome.is_none()) {
                return Err(AdminError::Refused(format!(
                    "a rebuild of {name} is already running"
                )));
            }
            rebuilds.insert(
                name.to_owned(),
                Rebuild {
                    version: 0,
                    statuses: Vec::new(),
                    outcome: None,
                },
            );
        }
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (db, store, rebuilds) = (self.db.clone(), self.store.clone(), self.rebuilds.clone());
        let catalog = self.catalog.clone();
        let key = name.to_owned();
        tokio::spawn(async move {
            let args = RebuildArgs {
                name: key.clone(),
                // No partitions given: as many as the active version.
                samples: 5,
                quiet: true,
                ..RebuildArgs::default()
            };
            let tracked = rebuilds.clone();
            let on_start = move |version: u32, statuses: &[ProjectionStatus]| {
                lock(&tracked).insert(
                    key,
                    Rebuild {
                        version,
                        statuses: statuses.to_vec(),
                        outcome: None,
                    },
                );
                let _ = started_tx.send(version);
            };
            let outcome = async {
                let admin = db.admin().await?;
                projections_cli::rebuild(&catalog, &db, &admin, store, &args, on_start).await
            }
            .await;
            let outcome = match outcome {
                Ok(report) => {
                    tracing::info!(projection = %args.name, version = report.version, events = report.events, "rebuild swapped in");
                    Ok(())
                }
                Err(e) => {
                    tracing::error!(projection = %args.name, error = %format!("{e:#}"), "rebuild failed");
                    Err(format!("{e:#}"))
                }
            };
            // The entry was claimed before the task started.
            if let Some(r) = lock(&rebuilds).get_mut(&args.name) {
                r.outcome = Some(outcome);
            }
        });
        match started_rx.await {
            Ok(_) => self
                .rebuild_view(name)
                .ok_or_else(|| failed("the rebuild vanished")),
            Err(_) => {
                let why = lock(&self.rebuilds)
                    .remove(name)
                    .and_then(|r| r.outcome)
                    .and_then(Result::err)
                    .unwrap_or_else(|| "the rebuild did not start".into());
                Err(AdminError::Refused(why))
            }
        }
    }

    async fn parked(&self, name: &str) -> Result<Vec<ParkedEvent>, AdminError> {
        let admin = self.db.admin().await.map_err(failed)?;
        admin.parked(name).await.map_err(failed)
    }

    async fn retry(&self, name: &str) -> Result<RetryReport, AdminError> {
        projections_cli::retry(&self.catalog, &self.db, &self.store, name)
            .await
            .map_err(classify)
    }

    async fn skip(&self, name: &str, position: u64) -> Result<bool, AdminError> {
        let admin = self.db.admin().await.map_err(failed)?;
        admin.skip(name, position).await.map_err(failed)
    }
}

/// The declared read models, for `/read-models/…`: their rows through a
/// [`Reader`] of the read-model database, their progress from the
/// projections' registry.
pub struct DeclaredReadModels {
    reader: Reader,
    projections: Arc<CatalogAdmin>,
}

impl DeclaredReadModels {
    pub fn new(
        catalog: &Catalog,
        db: &ReadModelDb,
        projections: Arc<CatalogAdmin>,
    ) -> anyhow::Result<Self> {
        let definitions = catalog.definitions();
        let reader = match db {
            ReadModelDb::Sqlite(path) => Reader::sqlite(path, definitions),
            ReadModelDb::Postgres { url, schema } => Reader::postgres(url, schema, definitions)?,
        };
        Ok(DeclaredReadModels {
            reader,
            projections,
        })
    }
}

fn answered(answer: Answer) -> QueryAnswer {
    let rows = answer.rows.into_iter().map(Value::Object).collect();
    QueryAnswer::new(rows, answer.position, answer.next)
}

fn query_failed(e: QueryError) -> ReadModelError {
    match e {
        QueryError::NotFound(m) => ReadModelError::NotFound(m),
        QueryError::Invalid(m) => ReadModelError::Invalid(m),
        other => ReadModelError::Failed(Box::new(other)),
    }
}

#[async_trait]
impl ReadModelsApi for DeclaredReadModels {
    async fn list(&self, head: u64) -> Result<Vec<ReadModelView>, ReadModelError> {
        let projections = self
            .projections
            .list(head)
            .await
            .map_err(|e| ReadModelError::Failed(Box::new(e)))?;
        Ok(self
            .reader
            .definitions()
            .read_models()
            .iter()
            .map(|model| {
                let name = model.name().to_owned();
                match projections.iter().find(|p| p.name == model.name()) {
                    Some(p) => ReadModelView::new(name, model.version(), p.state).with_progress(
                        p.checkpoint,
                        p.lag_events,
                        p.lag_seconds,
                    ),
                    None => ReadModelView::new(name, model.version(), ProjectionState::Stopped)
                        .with_progress(0, head, 0.0),
                }
            })
            .collect())
    }

    async fn table(
        &self,
        read_model: &str,
        table: &str,
        params: &[(String, String)],
    ) -> Result<QueryAnswer, ReadModelError> {
        let request = TableRequest::from_params(params).map_err(query_failed)?;
        self.reader
            .table(read_model, table, &request)
            .await
            .map(answered)
            .map_err(query_failed)
    }

    async fn query(
        &self,
        read_model: &str,
        query: &str,
        params: &[(String, String)],
    ) -> Result<QueryAnswer, ReadModelError> {
        self.reader
            .query(read_model, query, params)
            .await
            .map(answered)
            .map_err(query_failed)
    }

    async fn position(&self, read_model: &str) -> Result<u64, ReadModelError> {
        self.reader.position(read_model).await.map_err(query_failed)
    }

    async fn check(
        &self,
        read_model: &str,
        target: Target<'_>,
        params: &[(String, String)],
    ) -> Result<(), ReadModelError> {
        match target {
            Target::Table(table) => {
                let request = TableRequest::from_params(params).map_err(query_failed)?;
                self.reader.check_table(read_model, table, &request)
            }
            Target::Query(query) => self.reader.check_query(read_model, query, params),
            _ => Ok(()),
        }
        .map_err(query_failed)
    }
}

#[async_trait]
impl DashboardData for DeclaredReadModels {
    /// Each declared panel with its query's rows, read now.
    async fn panels(&self) -> Result<Vec<PanelView>, AdminError> {
        let now = chrono::Utc::now();
        let mut panels = Vec::new();
        for model in self.reader.definitions().read_models() {
            for panel in model.panels() {
                let rows = self
                    .reader
                    .query(model.name(), &panel.query, &panel.params(now))
                    .await
                    .map(|answer| {
                        let rows = answer.rows.into_iter().map(Value::Object).collect();
                        (rows, answer.position)
                    })
                    .map_err(|e| e.to_string());
                panels.push(
                    PanelView::new(
                        model.name().to_owned(),
                        panel.title.clone(),
                        panel.query.clone(),
                        panel.chart.clone(),
                    )
                    .drawing(
                        panel.x.clone(),
                        panel.y.clone(),
                        panel.series.clone(),
                        panel.columns.clone(),
                        panel.cents.clone(),
                    )
                    .with_rows(rows),
                );
            }
        }
        Ok(panels)
    }
}
