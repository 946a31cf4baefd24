//! Appending and reading: `POST /streams/{id}`, `GET /streams/{id}`,
//! `GET /all`, `GET /categories/{category}`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use factline_core::{
    check_category, CommandKey, Direction, EventData, ExpectedVersion, IdempotencyMismatch,
    ReadStream, RecordedEvent, StoreError, StreamFilter, StreamId,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::guard::JsonWrite;
use crate::{ApiError, Authenticated, Caller, Shared};

pub const EXPECTED_VERSION: &str = "expected-version";
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on the answer to an append that repeated a stored idempotency key.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Events as every read answers them.
#[derive(Serialize)]
pub struct Events {
    pub events: Vec<RecordedEvent>,
}

/// The correlation id a client sent, under either of the usual names.
pub fn correlation_header(headers: &HeaderMap) -> Option<String> {
    ["correlation-id", "x-correlation-id"]
        .iter()
        .find_map(|name| headers.get(*name))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

pub(crate) fn parse_stream_id(raw: &str) -> Result<StreamId, ApiError> {
    StreamId::new(raw).map_err(|e| ApiError::bad_request(e.to_string()))
}

pub(crate) fn parse_category(raw: &str) -> Result<String, ApiError> {
    check_category(raw).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(raw.to_owned())
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::bad_request(format!("header {name} is not visible ASCII")))
        })
        .transpose()
}

/// Parses an append's body: one event object or an array of them.
fn parse_events(body: &[u8]) -> Result<Vec<EventData>, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let events = match first {
        None => return Err(ApiError::bad_request("the body is empty: send an event object `{\"type\": …, \"data\": …}` or an array of them")),
        Some(b'[') => serde_json::from_slice::<Vec<EventData>>(body),
        Some(_) => serde_json::from_slice::<EventData>(body).map(|e| vec![e]),
    }
    .map_err(|e| ApiError::bad_request(format!("the body is not an event or an array of events ({{\"event_id\"?, \"type\", \"data\"?, \"metadata\"?}}): {e}")))?;
    if events.is_empty() {
        return Err(ApiError::bad_request("the array holds no events"));
    }
    Ok(events)
}

/// A rejected body: over the size limit, or unreadable.
fn body_problem(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(format!(
            "the request body is over the limit of {limit} bytes"
        ))
    } else {
        ApiError::bad_request(format!("cannot read the request body: {rejection}"))
    }
}

pub async fn append(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    _: JsonWrite,
    Path(stream_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let stream_id = parse_stream_id(&stream_id)?;
    caller.may_write(stream_id.category())?;
    let body = body.map_err(|r| body_problem(r, state.config.body_limit))?;
    let expected = match header_text(&headers, EXPECTED_VERSION)? {
        None => ExpectedVersion::Any,
        Some(text) => text
            .parse()
            .map_err(|e: factline_core::ParseExpectedVersionError| {
                ApiError::bad_request(format!("header Expected-Version: {e}"))
            })?,
    };
    let mut events = parse_events(&body)?;
    if let Some(correlation_id) = correlation_header(&headers) {
        for event in &mut events {
            event
                .metadata
                .correlation_id
                .get_or_insert_with(|| correlation_id.clone());
        }
    }
    let count = events.len();
    let key = header_text(&headers, IDEMPOTENCY_KEY)?;
    let appended = match key {
        None => state
            .store
            .append(&stream_id, expected, events)
            .await
            .map(|result| (result, false)),
        Some(key) => {
            // The same key with another stream or body is another command.
            let mut fingerprint = Sha256::new();
            fingerprint.update(stream_id.as_str().as_bytes());
            fingerprint.update([0]);
            fingerprint.update(&body);
            let fingerprint: String = fingerprint
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            // The key as sent is what the limits are about; the scoped
            // one below stays within them.
            CommandKey::new(key, "").validate()?;
            let command = CommandKey::new(scoped_key(&caller, key), fingerprint);
            state
                .store
                .append_command(&stream_id, expected, events, &command)
                .await
                .map(|appended| {
                    let replayed = matches!(appended, factline_core::Appended::Replayed(_));
                    (appended.result().clone(), replayed)
                })
        }
    };
    let (result, replayed) = appended.map_err(|e| within_scope(&caller, key, e))?;
    tracing::debug!(stream = %stream_id, events = count, caller = caller.name(), "appended");
    let mut response = (StatusCode::CREATED, Json(result)).into_response();
    if replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// An idempotency key as stored: a token's keys live apart from every
/// other token's, so no client can take (squat) a key another will send.
/// Anonymous callers (a server without tokens) share one space.
fn scoped_key(caller: &Caller, key: &str) -> String {
    let Caller::Token { name, .. } = caller else {
        return key.to_owned();
    };
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let scope = hex(&Sha256::digest(name.as_bytes())[..8]);
    let scoped = format!("{scope}/{key}");
    if scoped.len() <= CommandKey::MAX_KEY_BYTES {
        scoped
    } else {
        // Still unique per key, within the stored length.
        format!("{scope}#{}", hex(&Sha256::digest(key.as_bytes())))
    }
}

/// A store's refusal as the caller may see it: nothing about a stream of
/// a category the caller cannot read, and the idempotency key as sent.
fn within_scope(caller: &Caller, key: Option<&str>, error: StoreError) -> ApiError {
    match error {
        StoreError::IdempotencyMismatch {
            reason:
                IdempotencyMismatch::OtherStream {
                    event_id,
                    stream_id,
                },
            ..
        } if caller.may_read(stream_id.category()).is_err() => {
            ApiError::IdempotencyMismatch(format!(
                "event id {event_id} is already used by another event; a new event needs a new id"
            ))
        }
        StoreError::CommandKeyReused { stream_id, .. } => {
            let key = key.unwrap_or_default();
            let message = if caller.may_read(stream_id.category()).is_ok() {
                format!("idempotency key {key:?} was already used by a different command (on stream {stream_id})")
            } else {
                format!("idempotency key {key:?} was already used by a different command")
            };
            ApiError::KeyReused(message)
        }
        other => ApiError::Store(other),
    }
}

/// Query parameters, with an error naming any that is unknown or bad.
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    pub fn parse(raw: Option<String>, known: &[&str]) -> Result<Self, ApiError> {
        let mut params = HashMap::new();
        for pair in raw
            .as_deref()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_decode(s).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "query parameter {pair:?} is not valid percent-encoding"
                    ))
                })
            };
            let name = decode(name)?;
            if !known.contains(&name.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {name:?}; this route takes {}",
                    known.join(", ")
                )));
            }
            params.insert(name, decode(value)?);
        }
        Ok(Params(params))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "query parameter {name} must be a whole number, not {v:?}"
                    ))
                })
            })
            .transpose()
    }

    /// `limit`: 1 to the server's page size, which is also the default.
    pub fn limit(&self, max: usize) -> Result<usize, ApiError> {
        match self.number("limit")? {
            None => Ok(max),
            Some(n) if n >= 1 && n <= max as u64 => Ok(n as usize),
            Some(n) => Err(ApiError::bad_request(format!(
                "limit must be between 1 and {max}, not {n}"
            ))),
        }
    }
}

/// Decodes `%XX` escapes and `+` (a space in query strings).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

pub async fn read_stream(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    Path(stream_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let stream_id = parse_stream_id(&stream_id)?;
    caller.may_read(stream_id.category())?;
    let params = Params::parse(query, &["from", "limit", "direction"])?;
    let direction = match params.get("direction") {
        None | Some("forwards") => Direction::Forwards,
        Some("backwards") => Direction::Backwards,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "direction must be forwards or backwards, not {other:?}"
            )))
        }
    };
    let options = ReadStream {
        direction,
        from_version: params.number("from")?,
        limit: params.limit(state.config.max_page)?,
    };
    let _permit = read_permit(&state).await?;
    let events = state
        .store
        .read_stream_bounded(&stream_id, options, state.config.max_page_bytes)
        .await?;
    page(events)
}

/// Waits for one of the reads that may run at once (the request timeout
/// bounds the wait), so concurrent pages cannot add up without bound.
async fn read_permit(state: &Shared) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    state
        .reads
        .acquire()
        .await
        .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))
}

/// A page as its JSON text, made while the read's permit is held: the
/// events and their text are the memory a read takes.
fn page(events: Vec<RecordedEvent>) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(&Events { events })
        .map_err(|e| ApiError::Internal(format!("cannot encode the page: {e}")))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

async fn read_filtered(
    state: &Shared,
    filter: StreamFilter,
    query: Option<String>,
) -> Result<Response, ApiError> {
    let params = Params::parse(query, &["from", "limit"])?;
    let from = params.number("from")?.unwrap_or(1);
    let limit = params.limit(state.config.max_page)?;
    let _permit = read_permit(state).await?;
    let events = state
        .store
        .read_filtered_bounded(&filter, from, limit, state.config.max_page_bytes)
        .await?;
    page(events)
}

pub async fn read_all(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    caller.may_read_all()?;
    read_filtered(&state, StreamFilter::All, query).await
}

pub async fn read_category(
    State(state): State<Shared>,
    Authenticated(caller): Authenticated,
    Path(category): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let category = parse_category(&category)?;
    caller.may_read(&category)?;
    read_filtered(&state, StreamFilter::Category(category), query).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_one_event_or_an_array() {
        assert_eq!(parse_events(br#"{"type":"A"}"#).unwrap().len(), 1);
        assert_eq!(
            parse_events(br#" [{"type":"A"},{"type":"B","data":{"x":1}}]"#)
                .unwrap()
                .len(),
            2
        );
        for bad in [&b""[..], b"  ", b"[]", b"{", br#"{"typ":"A"}"#, b"42"] {
            assert!(
                matches!(parse_events(bad), Err(ApiError::BadRequest(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn query_parameters_are_decoded_and_checked() {
        let p = Params::parse(Some("from=3&limit=%31%30".into()), &["from", "limit"]).unwrap();
        assert_eq!(p.number("from").unwrap(), Some(3));
        assert_eq!(p.limit(100).unwrap(), 10);
        assert!(Params::parse(Some("form=3".into()), &["from"]).is_err());
        assert!(Params::parse(Some("from=%zz".into()), &["from"]).is_err());
        let p = Params::parse(Some("from=x&limit=0".into()), &["from", "limit"]).unwrap();
        assert!(p.number("from").is_err());
        assert!(p.limit(100).is_err());
        assert_eq!(percent_decode("a+b%2Fc").as_deref(), Some("a b/c"));
    }
}
