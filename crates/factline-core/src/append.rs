//! Append rules shared by every backend, so they cannot drift apart.

use std::collections::HashSet;
use std::time::Duration;

use uuid::Uuid;

use crate::{
    AppendResult, EventData, ExpectedVersion, IdempotencyMismatch, Metadata, StoreError, StreamId,
};

/// Guardrails applied to every append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest accepted event: type + JSON data + JSON metadata, in bytes.
    pub max_event_bytes: usize,
    /// Most events accepted in one append.
    pub max_events_per_append: usize,
    /// How long command idempotency keys are kept (C3). An older key counts
    /// as absent and is purged.
    pub command_retention: Duration,
    /// How often a store deletes expired command keys, at most.
    pub command_purge_interval: Duration,
}

impl Limits {
    /// The default for [`Limits::max_event_bytes`]: 64 KiB.
    pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;
    /// The longest event type accepted, in bytes.
    pub const MAX_EVENT_TYPE_BYTES: usize = 256;
    /// The default for [`Limits::command_retention`]: seven days.
    pub const DEFAULT_COMMAND_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: Self::DEFAULT_MAX_EVENT_BYTES,
            max_events_per_append: 10_000,
            command_retention: Self::DEFAULT_COMMAND_RETENTION,
            command_purge_interval: Duration::from_secs(3600),
        }
    }
}

/// An event after validation, with its JSON already serialised.
#[derive(Clone, Debug)]
pub struct EncodedEvent {
    /// The event's id (given, or new).
    pub event_id: Uuid,
    /// The event's type, checked.
    pub event_type: String,
    /// The data as JSON text, checked readable.
    pub data: String,
    /// `None` when the metadata is the default, so stores can skip it.
    pub metadata: Option<String>,
}

/// Checks an append before anything is written and encodes its events (the
/// data is JSON text already; only non-default metadata is serialised).
/// Every backend calls this first, so the same input is refused the same way
/// everywhere.
pub fn validate_append(
    events: &[EventData],
    limits: &Limits,
) -> Result<Vec<EncodedEvent>, StoreError> {
    if events.is_empty() {
        return Err(StoreError::invalid_input(
            "an append needs at least one event",
        ));
    }
    if events.len() > limits.max_events_per_append {
        return Err(StoreError::invalid_input(format!(
            "an append holds at most {} events, this one has {}",
            limits.max_events_per_append,
            events.len()
        )));
    }
    let mut seen = HashSet::with_capacity(events.len());
    if let Some(event) = events.iter().find(|e| !seen.insert(e.event_id)) {
        return Err(StoreError::invalid_input(format!(
            "event id {} appears twice in one append",
            event.event_id
        )));
    }
    events.iter().map(|e| encode_event(e, limits)).collect()
}

/// Checks one event and serialises its metadata; its data is JSON text
/// already. Metadata is typed, so what serialises from it reads back.
fn encode_event(event: &EventData, limits: &Limits) -> Result<EncodedEvent, StoreError> {
    validate_event_type(&event.event_type)?;
    let data = event.data.as_str();
    // Syntax alone is not enough: every reader parses the data, so what
    // it cannot parse must not be stored.
    event.data.check_readable().map_err(|e| {
        StoreError::invalid_input(format!(
            "event {} data cannot be read back as JSON: {e} (numbers must fit a 64-bit float, \
             nesting stay under 128 levels, and \\u escapes pair surrogates)",
            event.event_id
        ))
    })?;
    let metadata = if event.metadata == Metadata::default() {
        None
    } else {
        Some(serde_json::to_string(&event.metadata).map_err(|e| {
            StoreError::invalid_input(format!("event {} metadata: {e}", event.event_id))
        })?)
    };
    let size = event.event_type.len() + data.len() + metadata.as_ref().map_or(0, String::len);
    if size > limits.max_event_bytes {
        return Err(StoreError::TooLarge {
            event_id: event.event_id,
            size,
            max: limits.max_event_bytes,
        });
    }
    Ok(EncodedEvent {
        event_id: event.event_id,
        event_type: event.event_type.clone(),
        data: data.to_owned(),
        metadata,
    })
}

fn validate_event_type(event_type: &str) -> Result<(), StoreError> {
    let problem = if event_type.is_empty() {
        "is empty"
    } else if event_type.len() > Limits::MAX_EVENT_TYPE_BYTES {
        "is longer than 256 bytes"
    } else if event_type.chars().any(char::is_control) {
        "contains a control character"
    } else {
        return Ok(());
    };
    Err(StoreError::invalid_input(format!(
        "event type {:?} {problem}",
        event_type.chars().take(64).collect::<String>()
    )))
}

/// Where an event id of an incoming append is already stored, and what
/// is stored under it (a retry must repeat it exactly).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingEvent {
    /// The stream holding the stored event.
    pub stream_id: StreamId,
    /// Its version in that stream.
    pub version: u64,
    /// Its global position.
    pub position: u64,
    /// Its type, JSON data text and JSON metadata text (`None`: the
    /// default metadata), as stored.
    pub content: StoredContent,
}

/// An event's type, data and metadata as stored, or as encoded to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredContent {
    /// The event type.
    pub event_type: String,
    /// The data's JSON text.
    pub data: String,
    /// The metadata's JSON text; `None` for the default metadata.
    pub metadata: Option<String>,
}

impl StoredContent {
    /// The content an encoded event would be stored with.
    pub fn of(event: &EncodedEvent) -> Self {
        StoredContent {
            event_type: event.event_type.clone(),
            data: event.data.clone(),
            metadata: event.metadata.clone(),
        }
    }

    /// Whether `event` says the same: the same type, and data and metadata
    /// equal as JSON (so `{"a": 1}` repeats `{"a":1}`).
    pub fn same_as(&self, event: &EncodedEvent) -> bool {
        fn same_json(stored: &str, sent: &str) -> bool {
            stored == sent
                || matches!(
                    (serde_json::from_str::<serde_json::Value>(stored), serde_json::from_str::<serde_json::Value>(sent)),
                    (Ok(a), Ok(b)) if a == b
                )
        }
        let metadata = |text: Option<&str>| match text {
            None => Some(Metadata::default()),
            Some(text) => serde_json::from_str::<Metadata>(text).ok(),
        };
        self.event_type == event.event_type
            && same_json(&self.data, &event.data)
            && (self.metadata == event.metadata || {
                let stored = metadata(self.metadata.as_deref());
                stored.is_some() && stored == metadata(event.metadata.as_deref())
            })
    }
}

/// Decides what an append means when some of its event ids may already be
/// stored (S3).
///
/// `existing[i]` is where `events[i]`'s id is stored, if anywhere, and
/// `current_version` is the stream's version now. Returns `Ok(None)` when no
/// id is stored (a normal append), `Ok(Some(original))` for an exact retry
/// (the same ids, in order, with the same type, data and metadata), and an
/// error for anything in between.
pub fn resolve_duplicates(
    stream_id: &StreamId,
    expected: ExpectedVersion,
    current_version: u64,
    events: &[EncodedEvent],
    existing: &[Option<ExistingEvent>],
) -> Result<Option<AppendResult>, StoreError> {
    let stored = existing.iter().flatten().count();
    if stored == 0 {
        return Ok(None);
    }
    let mismatch = |reason| StoreError::IdempotencyMismatch {
        stream_id: stream_id.clone(),
        reason,
    };
    let elsewhere = events.iter().zip(existing).find_map(|(sent, e)| match e {
        Some(e) if &e.stream_id != stream_id => Some((sent.event_id, e.stream_id.clone())),
        _ => None,
    });
    if let Some((event_id, other_stream)) = elsewhere {
        return Err(mismatch(IdempotencyMismatch::OtherStream {
            event_id,
            stream_id: other_stream,
        }));
    }
    if stored < existing.len() {
        return Err(mismatch(IdempotencyMismatch::PartialOverlap {
            stored,
            total: existing.len(),
        }));
    }
    let run: Vec<&ExistingEvent> = existing.iter().flatten().collect();
    let first = run[0];
    let last = run[run.len() - 1];
    let consecutive = run
        .iter()
        .enumerate()
        .all(|(i, e)| e.version == first.version + i as u64);
    if !consecutive {
        return Err(mismatch(IdempotencyMismatch::DifferentOrder));
    }
    let changed = events
        .iter()
        .zip(&run)
        .find(|(sent, stored)| !stored.content.same_as(sent));
    if let Some((sent, _)) = changed {
        return Err(mismatch(IdempotencyMismatch::DifferentContent {
            event_id: sent.event_id,
        }));
    }
    // The retry must state an expectation the original append could have
    // met; otherwise it is a different request and gets the normal conflict.
    let consistent = match expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => first.version == 1,
        ExpectedVersion::StreamExists => first.version > 1,
        ExpectedVersion::Exact(n) => first.version == n + 1,
    };
    if !consistent {
        return Err(StoreError::Conflict {
            stream_id: stream_id.clone(),
            expected,
            actual: current_version,
        });
    }
    Ok(Some(AppendResult {
        stream_id: stream_id.clone(),
        first_version: first.version,
        last_version: last.version,
        first_position: first.position,
        last_position: last.position,
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn events(n: usize) -> Vec<EventData> {
        (0..n)
            .map(|i| EventData::new("Tested", json!({ "i": i })))
            .collect()
    }

    /// C3 keeps command keys for 7 days unless configured otherwise.
    #[test]
    fn command_keys_are_kept_a_week_by_default() {
        let limits = Limits::default();
        assert_eq!(limits.command_retention, Duration::from_secs(7 * 24 * 3600));
        assert!(limits.command_purge_interval < limits.command_retention);
    }

    /// Encoding keeps the order and the JSON text, and the first error
    /// anywhere in a large append surfaces.
    #[test]
    fn large_appends_encode_in_order_and_report_errors_anywhere() {
        let limits = Limits::default();
        let batch = events(1025);
        let encoded = validate_append(&batch, &limits).unwrap();
        assert_eq!(encoded.len(), batch.len());
        for (e, sent) in encoded.iter().zip(&batch) {
            assert_eq!(e.event_id, sent.event_id);
            assert_eq!(e.data, sent.data.as_str());
        }

        let mut too_big = batch.clone();
        let last = too_big.len() - 1;
        too_big[last].data = json!("x".repeat(limits.max_event_bytes)).into();
        match validate_append(&too_big, &limits) {
            Err(StoreError::TooLarge { event_id, .. }) => {
                assert_eq!(event_id, too_big[last].event_id)
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }

        let mut bad_types = batch.clone();
        bad_types[3].event_type = String::new();
        bad_types[last].event_type = "\n".into();
        match validate_append(&bad_types, &limits) {
            Err(StoreError::InvalidInput(message)) => assert!(message.contains("is empty")),
            other => panic!("expected the first invalid type, got {other:?}"),
        }

        let mut repeated = batch;
        repeated[last].event_id = repeated[0].event_id;
        assert!(matches!(
            validate_append(&repeated, &limits),
            Err(StoreError::InvalidInput(m)) if m.contains("appears twice")
        ));
    }
}
