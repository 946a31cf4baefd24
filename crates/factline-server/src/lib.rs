//! factline's HTTP server: the event API (append, read, Server-Sent Events
//! subscriptions), the admin API, Prometheus metrics, health checks,
//! bearer-token access control and the dashboard, over any
//! [`factline_core::EventStore`].
//!
//! The server knows no projection's code and no read model: what it shows
//! of them comes through [`ProjectionsAdmin`] and [`DashboardData`], which
//! the embedding binary implements.

#![warn(missing_docs)]

mod admin;
mod auth;
mod connections;
mod dashboard;
mod error;
mod events;
mod guard;
mod metrics;
mod openapi;
mod read_models;
mod slots;
pub mod sse;
mod subscribe;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use factline_core::EventStore;
use factline_outbox::OutboxDb;
use serde_json::json;
use tokio::sync::watch;

pub use admin::{
    DashboardData, PanelView, ProjectionState, ProjectionView, ProjectionsAdmin, RebuildState,
    RebuildView,
};
pub use auth::{Caller, CategorySet, Scopes, Token, Tokens, TokensError, MIN_TOKEN_LEN};
pub use connections::{serve_with_limits, ConnectionLimits};
pub use error::{AdminError, ApiError};
pub use guard::BrowserPolicy;
pub use metrics::{install_recorder, InstrumentedStore};
pub use read_models::{QueryAnswer, ReadModelError, ReadModelView, ReadModelsApi, Target};

/// How the server treats requests.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// `None` lets everyone do everything: for a server on loopback only.
    pub tokens: Option<Tokens>,
    /// The largest request body accepted, in bytes.
    pub body_limit: usize,
    /// How long a request (other than a subscription) may take.
    pub request_timeout: Duration,
    /// How often an idle subscription sends a comment line, so proxies
    /// keep the connection open.
    pub heartbeat: Duration,
    /// The most events one read returns.
    pub max_page: usize,
    /// A page ends at the event that brings its data and metadata to this
    /// many bytes (so pages of large events stay small in memory); clients
    /// go on from the last position they got.
    pub max_page_bytes: usize,
    /// Reads (pages) that run at once; more wait their turn.
    pub max_concurrent_reads: usize,
    /// Limits on connections: the header deadline and how many at once.
    pub connections: ConnectionLimits,
    /// Subscriptions open at once, in all; one more is answered 503.
    pub max_subscriptions: usize,
    /// Subscriptions open at once per token (anonymous callers share one
    /// count); one more is answered 429.
    pub max_subscriptions_per_token: usize,
    /// Which `Host` names and page origins are answered.
    pub browsers: BrowserPolicy,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tokens: None,
            body_limit: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(15),
            max_page: 1000,
            max_page_bytes: 4 * 1024 * 1024,
            max_concurrent_reads: 16,
            connections: ConnectionLimits::default(),
            max_subscriptions: 2048,
            max_subscriptions_per_token: 256,
            browsers: BrowserPolicy::default(),
        }
    }
}

/// What the handlers share.
pub(crate) struct AppState {
    pub store: Arc<dyn EventStore>,
    pub config: ServerConfig,
    pub projections: Option<Arc<dyn ProjectionsAdmin>>,
    pub outbox: Option<Arc<dyn OutboxDb>>,
    pub dashboard: Option<Arc<dyn DashboardData>>,
    pub read_models: Option<Arc<dyn ReadModelsApi>>,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: Option<::metrics_exporter_prometheus::PrometheusHandle>,
    pub rates: Arc<dashboard::RateSampler>,
    pub counts: dashboard::EventCounts,
    pub subscriptions: Arc<slots::Slots>,
    pub reads: tokio::sync::Semaphore,
}

pub(crate) type Shared = Arc<AppState>;

/// A server over one store; [`Server::router`] makes the axum router.
pub struct Server {
    state: AppState,
}

impl Server {
    /// A server over `store`, with no projections, outbox, dashboard data or metrics until given.
    pub fn new(store: Arc<dyn EventStore>, config: ServerConfig) -> Self {
        let (_, shutdown) = watch::channel(false);
        let subscriptions =
            slots::Slots::new(config.max_subscriptions, config.max_subscriptions_per_token);
        let reads = tokio::sync::Semaphore::new(config.max_concurrent_reads.max(1));
        Server {
            state: AppState {
                store,
                config,
                projections: None,
                outbox: None,
                dashboard: None,
                read_models: None,
                shutdown,
                metrics: None,
                rates: Arc::default(),
                counts: dashboard::EventCounts::default(),
                subscriptions,
                reads,
            },
        }
    }

    /// The admin API's access to the projections.
    pub fn with_projections(mut self, admin: Arc<dyn ProjectionsAdmin>) -> Self {
        self.state.projections = Some(admin);
        self
    }

    /// The outbox whose backlog the admin API, metrics and dashboard show.
    pub fn with_outbox(mut self, outbox: Arc<dyn OutboxDb>) -> Self {
        self.state.outbox = Some(outbox);
        self
    }

    /// The read models the dashboard charts.
    pub fn with_dashboard(mut self, data: Arc<dyn DashboardData>) -> Self {
        self.state.dashboard = Some(data);
        self
    }

    /// The declared read models `/read-models/…` answers queries on.
    pub fn with_read_models(mut self, read_models: Arc<dyn ReadModelsApi>) -> Self {
        self.state.read_models = Some(read_models);
        self
    }

    /// Subscriptions end when this turns true, so that a graceful shutdown
    /// does not wait for them forever.
    pub fn with_shutdown(mut self, shutdown: watch::Receiver<bool>) -> Self {
        self.state.shutdown = shutdown;
        self
    }

    /// Serves `/metrics` from this Prometheus recorder (see
    /// [`install_recorder`]).
    pub fn with_metrics(mut self, handle: ::metrics_exporter_prometheus::PrometheusHandle) -> Self {
        self.state.metrics = Some(handle);
        self
    }

    /// Serves on `listener` within the configured [`ConnectionLimits`]
    /// until `shutdown` completes, then lets requests in flight finish.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let limits = self.state.config.connections.clone();
        serve_with_limits(listener, self.router(), limits, shutdown).await
    }

    /// The axum router of every route, with the layers every request
    /// passes (limits, metrics, JSON errors, tracing).
    pub fn router(self) -> Router {
        let timeout = self.state.config.request_timeout;
        let body_limit = self.state.config.body_limit;
        if let Some(handle) = &self.state.metrics {
            metrics::spawn_upkeep(handle.clone());
        }
        let mut state = self.state;
        state.rates = dashboard::RateSampler::spawn(state.store.clone(), state.shutdown.clone());
        let state: Shared = Arc::new(state);
        // Subscriptions stay open as long as the client wants: no timeout.
        let subscriptions = Router::new()
            .route("/subscribe/all", get(subscribe::all))
            .route("/subscribe/streams/{stream_id}", get(subscribe::stream))
            .route("/subscribe/categories/{category}", get(subscribe::category));
        let requests = Router::new()
            .route(
                "/streams/{stream_id}",
                post(events::append).get(events::read_stream),
            )
            .route("/all", get(events::read_all))
            .route("/categories/{category}", get(events::read_category))
            .route("/openapi.json", get(openapi::document))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics::render))
            .route("/admin/projections", get(admin::projections))
            .route("/admin/projections/{name}", get(admin::projection))
            .route("/admin/projections/{name}/rebuild", post(admin::rebuild))
            .route("/admin/projections/{name}/pause", post(admin::pause))
            .route("/admin/projections/{name}/resume", post(admin::resume))
            .route("/admin/projections/{name}/parked", get(admin::parked))
            .route(
                "/admin/projections/{name}/parked/retry",
                post(admin::retry_parked),
            )
            .route(
                "/admin/projections/{name}/parked/{position}/skip",
                post(admin::skip_parked),
            )
            .route("/admin/outbox", get(admin::outbox))
            .route("/read-models", get(read_models::list))
            .route(
                "/read-models/{name}/tables/{table}",
                get(read_models::table),
            )
            .route(
                "/read-models/{name}/queries/{query}",
                get(read_models::query),
            )
            .route("/", get(dashboard::page))
            .route("/dashboard/data", get(dashboard::data))
            .route("/dashboard/app.js", get(dashboard::script))
            .route("/dashboard/style.css", get(dashboard::style))
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                timeout,
            ));
        Router::new()
            .merge(requests)
            .merge(subscriptions)
            .fallback(not_found)
            .layer(axum::extract::DefaultBodyLimit::max(body_limit))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                guard::browsers,
            ))
            .layer(axum::middleware::from_fn(error::json_errors))
            .layer(axum::middleware::from_fn(metrics::track_requests))
            .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(request_span))
            .with_state(state)
    }
}

/// The span of one request; it carries the correlation id a client sent,
/// so every log line of the request can be found by it.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let correlation_id = events::correlation_header(request.headers()).unwrap_or_default();
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        correlation_id = %correlation_id,
    )
}

/// Serves `router` on `listener` until `shutdown` completes, then lets
/// requests in flight finish; with the default [`ConnectionLimits`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_limits(listener, router, ConnectionLimits::default(), shutdown).await
}

/// Resolves when `shutdown` turns true. A watch whose sender is gone
/// never turns: this then waits forever (a server given no shutdown watch
/// keeps its subscriptions open instead of ending them all at once).
pub(crate) async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The `shutdown` future of [`serve`] for a stop watch: it completes when
/// the watch turns true.
pub async fn stopped_by(mut stop: watch::Receiver<bool>) {
    shut_down(&mut stop).await
}

/// The caller of a request, checked against the configured tokens.
pub(crate) struct Authenticated(pub Caller);

impl FromRequestParts<Shared> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        Caller::from_parts(state.config.tokens.as_ref(), parts).map(Authenticated)
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route {}: GET /openapi.json lists what this server answers",
        uri.path()
    ))
}

/// The process is up.
async fn health() -> impl IntoResponse {
    Json(json!({ "status": "up" }))
}

/// The store answers (so its schema is in place).
async fn ready(State(state): State<Shared>) -> impl IntoResponse {
    match state.store.head_position().await {
        Ok(head) => (
            StatusCode::OK,
            Json(json!({ "status": "ready", "head_position": head })),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "error": e.to_string() })),
        ),
    }
}
