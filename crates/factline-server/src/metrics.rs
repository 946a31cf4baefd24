//! Prometheus metrics (X3): what the store, the projections, the outbox,
//! the subscriptions and the HTTP layer do.
//!
//! Counters and histograms are recorded as things happen, through the
//! `metrics` facade; gauges of other parts (projection lag, outbox
//! backlog) are read when `/metrics` is scraped, so a scrape always shows
//! the database's current answer.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use factline_core::{
    AppendResult, Appended, CommandKey, CommandRecord, EventData, EventStore, ExpectedVersion,
    JsonText, ReadStream, RecordedEvent, Snapshot, StoreError, StreamFilter, StreamId,
    Subscription, Tally,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::{ApiError, Authenticated, Shared};

pub const APPENDS: &str = "factline_appends_total";
pub const APPENDED_EVENTS: &str = "factline_appended_events_total";
pub const APPEND_SECONDS: &str = "factline_append_duration_seconds";
pub const EVENTS: &str = "factline_events";
pub const SUBSCRIPTIONS: &str = "factline_subscriptions";
pub const SUBSCRIPTIONS_REFUSED: &str = "factline_subscriptions_refused_total";
pub const PROJECTION_LAG_EVENTS: &str = "factline_projection_lag_events";
pub const PROJECTION_LAG_SECONDS: &str = "factline_projection_lag_seconds";
pub const PROJECTION_PARKED: &str = "factline_projection_parked_events";
pub const OUTBOX_BACKLOG: &str = "factline_outbox_backlog";
pub const OUTBOX_OLDEST_AGE: &str = "factline_outbox_oldest_age_seconds";
pub const OUTBOX_FAILING: &str = "factline_outbox_failing";
pub const HTTP_REQUESTS: &str = "http_requests_total";
pub const CONNECTIONS: &str = "factline_http_connections";
pub const CONNECTIONS_REFUSED: &str = "factline_http_connections_refused_total";
pub const HTTP_SECONDS: &str = "http_request_duration_seconds";

/// Latency buckets from 100 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Installs the process's Prometheus recorder (once; later calls return
/// the same handle) and keeps its histograms trimmed in the background.
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| e.to_string())?;
            describe();
            Ok(handle)
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        APPENDS,
        "Appends by outcome (written, replayed, rejected, failed)"
    );
    metrics::describe_counter!(APPENDED_EVENTS, "Events written by this process");
    metrics::describe_histogram!(
        APPEND_SECONDS,
        metrics::Unit::Seconds,
        "Append latency, to commit"
    );
    metrics::describe_gauge!(EVENTS, "Events in the store (the head position)");
    metrics::describe_gauge!(SUBSCRIPTIONS, "Open Server-Sent Events subscriptions");
    metrics::describe_counter!(
        SUBSCRIPTIONS_REFUSED,
        "Subscriptions refused by a cap (reason: server or token)"
    );
    metrics::describe_gauge!(
        PROJECTION_LAG_EVENTS,
        "Events committed and not yet applied, per projection"
    );
    metrics::describe_gauge!(
        PROJECTION_LAG_SECONDS,
        "Age of the last applied event when behind, per projection"
    );
    metrics::describe_gauge!(PROJECTION_PARKED, "Parked events, per projection");
    metrics::describe_gauge!(OUTBOX_BACKLOG, "Outbox records not yet published");
    metrics::describe_gauge!(
        OUTBOX_OLDEST_AGE,
        "Age of the oldest unpublished outbox record"
    );
    metrics::describe_gauge!(
        OUTBOX_FAILING,
        "Unpublished outbox records that failed at least once"
    );
    metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests by method, route and status");
    metrics::describe_gauge!(CONNECTIONS, "Open HTTP connections");
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections answered 503 because the connection cap was reached"
    );
    metrics::describe_histogram!(
        HTTP_SECONDS,
        metrics::Unit::Seconds,
        "HTTP request latency by method and route"
    );
}

/// Records each request's count and latency by its route template (not
/// its path, which would make a series per stream). Every label comes from
/// a fixed set: methods other than the usual ones and paths no route
/// matches count as `other`, so no client can add series.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS, "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(HTTP_SECONDS, "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// `GET /metrics`.
pub async fn render(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
) -> Result<Response, ApiError> {
    caller.may_administer()?;
    let Some(handle) = state.metrics.clone() else {
        return Err(ApiError::NotFound(
            "this server was started without a metrics recorder".into(),
        ));
    };
    refresh_gauges(&state).await;
    handle.run_upkeep();
    Ok((
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        handle.render(),
    )
        .into_response())
}

/// Reads the gauges other parts own. A part that does not answer leaves
/// its gauges as they were and is logged: the scrape still succeeds.
async fn refresh_gauges(state: &Shared) {
    let head = match state.store.head_position().await {
        Ok(head) => {
            metrics::gauge!(EVENTS).set(head as f64);
            head
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: the store did not answer");
            return;
        }
    };
    if let Some(projections) = &state.projections {
        match projections.list(head).await {
            Ok(views) => {
                for view in views {
                    let name = view.name.clone();
                    metrics::gauge!(PROJECTION_LAG_EVENTS, "projection" => name.clone())
                        .set(view.lag_events as f64);
                    metrics::gauge!(PROJECTION_LAG_SECONDS, "projection" => name.clone())
                        .set(view.lag_seconds);
                    metrics::gauge!(PROJECTION_PARKED, "projection" => name)
                        .set(view.parked as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: the projections did not answer"),
        }
    }
    if let Some(outbox) = &state.outbox {
        match outbox.status().await {
            Ok(status) => {
                metrics::gauge!(OUTBOX_BACKLOG).set(status.backlog as f64);
                metrics::gauge!(OUTBOX_OLDEST_AGE).set(status.oldest_age_s);
                metrics::gauge!(OUTBOX_FAILING).set(status.failing as f64);
            }
            Err(e) => tracing::warn!(error = %e, "metrics: the outbox did not answer"),
        }
    }
}

/// A store that records every append's outcome and latency; everything
/// else goes straight to the store inside.
pub struct InstrumentedStore {
    inner: Arc<dyn EventStore>,
}

impl InstrumentedStore {
    /// Wraps `inner`, timing its appends and reads.
    pub fn new(inner: Arc<dyn EventStore>) -> Self {
        InstrumentedStore { inner }
    }
}

fn outcome(result: &Result<impl Sized, StoreError>) -> &'static str {
    match result {
        Ok(_) => "written",
        Err(e) if e.is_rejection() => "rejected",
        Err(_) => "failed",
    }
}

fn record_append(started: Instant, outcome: &'static str, events: usize) {
    metrics::histogram!(APPEND_SECONDS).record(started.elapsed().as_secs_f64());
    metrics::counter!(APPENDS, "outcome" => outcome).increment(1);
    if outcome == "written" {
        metrics::counter!(APPENDED_EVENTS).increment(events as u64);
    }
}

#[async_trait]
impl EventStore for InstrumentedStore {
    async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        let started = Instant::now();
        let count = events.len();
        let result = self.inner.append(stream_id, expected, events).await;
        record_append(started, outcome(&result), count);
        result
    }

    async fn append_command(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        command: &CommandKey,
    ) -> Result<Appended, StoreError> {
        let started = Instant::now();
        let count = events.len();
        let result = self
            .inner
            .append_command(stream_id, expected, events, command)
            .await;
        let outcome = match &result {
            Ok(Appended::Replayed(_)) => "replayed",
            other => outcome(other),
        };
        record_append(started, outcome, count);
        result
    }

    async fn find_command(&self, key: &str) -> Result<Option<CommandRecord>, StoreError> {
        self.inner.find_command(key).await
    }

    async fn purge_commands(&self) -> Result<u64, StoreError> {
        self.inner.purge_commands().await
    }

    async fn save_snapshot(
        &self,
        stream_id: &StreamId,
        version: u64,
        snapshot_version: u32,
        data: &JsonText,
    ) -> Result<(), StoreError> {
        self.inner
            .save_snapshot(stream_id, version, snapshot_version, data)
            .await
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load_snapshot(stream_id).await
    }

    async fn read_stream(
        &self,
        stream_id: &StreamId,
        options: ReadStream,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_stream(stream_id, options).await
    }

    async fn read_filtered(
        &self,
        filter: &StreamFilter,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_filtered(filter, from, limit).await
    }

    async fn read_filtered_bounded(
        &self,
        filter: &StreamFilter,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner
            .read_filtered_bounded(filter, from, limit, max_bytes)
            .await
    }

    async fn read_stream_bounded(
        &self,
        stream_id: &StreamId,
        options: ReadStream,
        max_bytes: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner
            .read_stream_bounded(stream_id, options, max_bytes)
            .await
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        self.inner.head_position().await
    }

    async fn tally(&self, after: u64, max_events: u64) -> Result<Tally, StoreError> {
        self.inner.tally(after, max_events).await
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.inner.watch_head()
    }

    fn subscribe(&self, filter: StreamFilter, from: u64) -> Subscription {
        self.inner.subscribe(filter, from)
    }
}

/// Trims the recorder's histograms every few seconds, so that a server
/// nobody scrapes does not keep every sample.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                handle.run_upkeep();
            }
        });
    }
}
