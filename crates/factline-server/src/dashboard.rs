//! The dashboard (X4): a page served from the binary (its HTML, CSS and
//! script are compiled in) that polls `/dashboard/data` and draws the
//! figures as SVG, and the sampler behind its append-rate chart.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{Html, IntoResponse};
use axum::Json;
use factline_core::EventStore;
use serde::Serialize;
use serde_json::{json, Value};

use crate::{ApiError, Authenticated, Shared};

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");

/// How many one-second samples the append-rate chart shows.
const SAMPLES: usize = 60;

pub async fn page() -> impl IntoResponse {
    Html(PAGE)
}

pub async fn script() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
}

pub async fn style() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/css; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        STYLE,
    )
}

/// One point of the append-rate chart.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RatePoint {
    /// Milliseconds since the Unix epoch.
    pub t: i64,
    pub events_per_second: f64,
}

/// The head position, sampled every second: the append rate of every
/// process writing to the store, not only of this one.
#[derive(Default)]
pub struct RateSampler {
    samples: Mutex<VecDeque<(i64, u64)>>,
}

impl RateSampler {
    pub fn spawn(
        store: Arc<dyn EventStore>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Arc<Self> {
        let sampler = Arc::new(RateSampler::default());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let shared = sampler.clone();
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = crate::shut_down(&mut stop) => return,
                    }
                    if let Ok(head) = store.head_position().await {
                        shared.record(chrono::Utc::now().timestamp_millis(), head);
                    }
                }
            });
        }
        sampler
    }

    fn record(&self, at_ms: i64, head: u64) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((at_ms, head));
        while samples.len() > SAMPLES + 1 {
            samples.pop_front();
        }
    }

    /// The rate between consecutive samples.
    pub fn series(&self) -> Vec<RatePoint> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(&(t0, h0), &(t1, h1))| RatePoint {
                t: t1,
                events_per_second: h1.saturating_sub(h0) as f64 * 1000.0 / (t1 - t0).max(1) as f64,
            })
            .collect()
    }
}

/// Most positions one dashboard answer counts: on a large store the
/// counts catch up over several answers instead of one slow one.
const COUNT_STEP: u64 = 250_000;

/// Events by category and type, kept as a running total: each answer
/// counts only what was appended since the last (see
/// [`EventStore::tally`]).
#[derive(Default)]
pub struct EventCounts {
    totals: tokio::sync::Mutex<Totals>,
}

#[derive(Default)]
struct Totals {
    upto: u64,
    /// Streams and events per category.
    categories: BTreeMap<String, (u64, u64)>,
    types: BTreeMap<String, u64>,
}

impl EventCounts {
    /// Counts what was appended since the last call (at most
    /// [`COUNT_STEP`] positions) and answers the totals as JSON.
    async fn advance(&self, store: &dyn EventStore) -> Result<Value, ApiError> {
        // One counter at a time: two answers must not count a range twice.
        let mut totals = self.totals.lock().await;
        let tally = store.tally(totals.upto, COUNT_STEP).await?;
        for row in &tally.rows {
            let category = totals.categories.entry(row.category.clone()).or_default();
            category.0 += row.streams_started;
            category.1 += row.events;
            *totals.types.entry(row.event_type.clone()).or_default() += row.events;
        }
        totals.upto = tally.upto.max(totals.upto);
        let mut categories: Vec<_> = totals.categories.iter().collect();
        categories.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(b.0)));
        let mut types: Vec<_> = totals.types.iter().collect();
        types.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        Ok(json!({
            "counted_to": totals.upto,
            "streams": totals.categories.values().map(|c| c.0).sum::<u64>(),
            "categories": categories.iter()
                .map(|(name, (streams, events))| json!({ "category": name, "streams": streams, "events": events }))
                .collect::<Vec<_>>(),
            "event_types": types.iter()
                .map(|(name, events)| json!({ "event_type": name, "events": events }))
                .collect::<Vec<_>>(),
        }))
    }
}

/// `GET /dashboard/data`: everything the page shows, in one answer.
pub async fn data(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Value>, ApiError> {
    caller.may_administer()?;
    let head = state.store.head_position().await?;
    let projections = match &state.projections {
        Some(p) => p.list(head).await?,
        None => Vec::new(),
    };
    let outbox = match &state.outbox {
        Some(o) => Some(
            o.status()
                .await
                .map_err(|e| ApiError::Internal(format!("the outbox did not answer: {e}")))?,
        ),
        None => None,
    };
    // Read models that cannot be read (not built yet on this store) leave
    // the rest of the page working: it says why instead of failing whole.
    let (panels, read_models_error) = match &state.dashboard {
        Some(d) => match d.panels().await {
            Ok(panels) => {
                let error = panels.iter().find_map(|p| {
                    p.error
                        .as_ref()
                        .map(|e| format!("{} ({}): {e}", p.title, p.read_model))
                });
                (panels, error)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the dashboard's read models cannot be read");
                (Vec::new(), Some(e.to_string()))
            }
        },
        None => (Vec::new(), None),
    };
    // Each panel's rows by query name as well: the shape the page read
    // before panels were declared.
    let read_models = (!panels.is_empty()).then(|| {
        let by_query: serde_json::Map<String, Value> = panels
            .iter()
            .filter(|p| p.error.is_none())
            .map(|p| (p.query.clone(), Value::Array(p.rows.clone())))
            .collect();
        Value::Object(by_query)
    });
    let counts = state.counts.advance(state.store.as_ref()).await?;
    let series = state.rates.series();
    // The latest sample, or nothing before the first two.
    let rate = series.last().map_or(0.0, |p| p.events_per_second);
    Ok(Json(json!({
        "generated_at": chrono::Utc::now(),
        "head_position": head,
        "events": counts,
        "append_rate": { "events_per_second": rate, "series": series },
        "parked_total": projections.iter().map(|p| p.parked).sum::<u64>(),
        "projections": projections,
        "outbox": outbox.map(|o| json!({
            "backlog": o.backlog,
            "oldest_age_s": o.oldest_age_s,
            "failing": o.failing,
            "last_error": o.last_error,
            "relays": o.relays,
        })),
        "read_models": read_models,
        "read_models_error": read_models_error,
        "panels": panels,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_the_head_difference_over_time_and_keeps_a_minute() {
        let sampler = RateSampler::default();
        sampler.record(0, 100);
        assert!(sampler.series().is_empty());
        sampler.record(1000, 150);
        sampler.record(3000, 250);
        let rates: Vec<f64> = sampler
            .series()
            .iter()
            .map(|p| p.events_per_second)
            .collect();
        assert_eq!(rates, [50.0, 50.0]);
        for i in 0..100 {
            sampler.record(4000 + i * 1000, 300 + i as u64);
        }
        assert_eq!(sampler.series().len(), SAMPLES);
    }
}
