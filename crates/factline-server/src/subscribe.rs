//! Subscriptions as Server-Sent Events: `GET /subscribe/all`,
//! `/subscribe/streams/{id}`, `/subscribe/categories/{category}`.
//!
//! Each event's SSE `id` is its global position, so a client that
//! reconnects with `Last-Event-ID` resumes right after the last event it
//! got. The store's [`Subscription`](factline_core::Subscription) does the
//! catch-up and the live part with no gap or duplicate at the hand-over;
//! this module only frames its events.

use std::convert::Infallible;

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use factline_core::{StreamFilter, Subscription};
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::watch;

use crate::events::{parse_category, parse_stream_id, Params};
use crate::slots::Slot;
use crate::{ApiError, Authenticated, Caller, Shared};

const LAST_EVENT_ID: &str = "last-event-id";

/// The first position to deliver: after `Last-Event-ID`, else `from`
/// (a position, or `end` for only new events), else the beginning.
async fn start_position(
    state: &Shared,
    headers: &HeaderMap,
    query: Option<String>,
) -> Result<u64, ApiError> {
    if let Some(last) = headers.get(LAST_EVENT_ID) {
        // Positions fit an i64 on every backend; anything larger is not
        // one (and must not wrap around to a replay from the start).
        let last = last
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&last| last < i64::MAX as u64)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "Last-Event-ID must be the global position of the last event received",
                )
            })?;
        return Ok(last + 1);
    }
    let params = Params::parse(query, &["from"])?;
    match params.get("from") {
        None => Ok(1),
        Some("end") => Ok(state.store.head_position().await? + 1),
        Some(_) => Ok(params.number("from")?.unwrap_or(1).max(1)),
    }
}

struct Follow {
    subscription: Subscription,
    shutdown: watch::Receiver<bool>,
    _slot: Slot,
    done: bool,
}

fn frame(follow: Follow) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(follow, |mut follow| async move {
        if follow.done || *follow.shutdown.borrow() {
            return None;
        }
        let next = tokio::select! {
            next = follow.subscription.next() => next,
            _ = crate::shut_down(&mut follow.shutdown) => return None,
        };
        let event = match next {
            Ok(event) => match serde_json::to_string(&event) {
                Ok(data) => Event::default().id(event.position.to_string()).data(data),
                Err(e) => {
                    follow.done = true;
                    error_event(&format!(
                        "cannot encode the event at {}: {e}",
                        event.position
                    ))
                }
            },
            // The subscription retried what was transient; this is not.
            Err(e) => {
                follow.done = true;
                tracing::warn!(error = %e, "subscription ended by a store failure");
                error_event(&e.to_string())
            }
        };
        Some((Ok(event), follow))
    })
}

fn error_event(message: &str) -> Event {
    Event::default()
        .event("error")
        .data(json!({ "error": "subscription_failed", "message": message }).to_string())
}

async fn open(
    state: Shared,
    caller: &Caller,
    filter: StreamFilter,
    headers: HeaderMap,
    query: Option<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let from = start_position(&state, &headers, query).await?;
    let slot = state.subscriptions.take(caller.name())?;
    let follow = Follow {
        subscription: state.store.subscribe(filter, from),
        shutdown: state.shutdown.clone(),
        _slot: slot,
        done: false,
    };
    Ok(Sse::new(frame(follow)).keep_alive(
        KeepAlive::new()
            .interval(state.config.heartbeat)
            .text("heartbeat"),
    ))
}

pub async fn all(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.may_read_all()?;
    open(state, &caller, StreamFilter::All, headers, query).await
}

pub async fn stream(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    Path(stream_id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let stream_id = parse_stream_id(&stream_id)?;
    caller.may_read(stream_id.category())?;
    open(
        state,
        &caller,
        StreamFilter::Stream(stream_id),
        headers,
        query,
    )
    .await
}

pub async fn category(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    Path(category): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let category = parse_category(&category)?;
    caller.may_read(&category)?;
    open(
        state,
        &caller,
        StreamFilter::Category(category),
        headers,
        query,
    )
    .await
}
