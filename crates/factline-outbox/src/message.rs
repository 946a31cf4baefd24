//! What a sink publishes for one outbox record.

use std::fmt::Write;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

/// One event on its way out. `payload` is the JSON envelope: the event as
/// factline's API shows a recorded event (`stream_id`, `version`,
/// `position`, `event_id`, `event_type`, `data`, `metadata`,
/// `recorded_at`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The event's global position.
    pub position: u64,
    /// The event's id (JetStream's `Nats-Msg-Id`, a webhook's idempotency key).
    pub event_id: Uuid,
    /// The event's stream.
    pub stream_id: String,
    /// The event's version in its stream.
    pub version: u64,
    /// The event's type.
    pub event_type: String,
    /// The subject it is published on, from its publication's template.
    pub subject: String,
    /// Its partition key, from its publication's template.
    pub key: String,
    /// The event's correlation id, if it has one.
    pub correlation_id: Option<String>,
    /// The event's causation id, if it has one.
    pub causation_id: Option<String>,
    /// The JSON envelope.
    pub payload: Bytes,
}

/// The columns of a stored event, as the outbox reads them (data and
/// metadata as the stored JSON text, never parsed into values).
pub(crate) struct StoredEvent<'a> {
    pub position: u64,
    pub stream_id: &'a str,
    pub version: u64,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub data: &'a str,
    /// `None`: the default metadata.
    pub metadata: Option<&'a str>,
    pub recorded_at: DateTime<Utc>,
}

/// The two ids a message carries as headers; the rest of the metadata
/// stays in the payload.
#[derive(Deserialize, Default)]
struct Ids {
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    causation_id: Option<String>,
}

const DEFAULT_METADATA: &str =
    r#"{"correlation_id":null,"causation_id":null,"schema_version":1,"headers":{}}"#;

impl StoredEvent<'_> {
    /// The message for this event. The envelope is written around the
    /// stored JSON text as it is (the store checked it when it was
    /// appended), so no event is parsed on its way out.
    pub fn into_message(self, subject: String, key: String) -> Result<Message, String> {
        let metadata_text = self.metadata.unwrap_or(DEFAULT_METADATA);
        let ids: Ids = match self.metadata {
            Some(text) => serde_json::from_str(text).map_err(|e| {
                format!(
                    "the stored metadata of the event at {} is not JSON: {e}",
                    self.position
                )
            })?,
            None => Ids::default(),
        };
        let text = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
        let recorded_at = self
            .recorded_at
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        let mut payload = String::with_capacity(self.data.len() + metadata_text.len() + 200);
        payload.push_str("{\"stream_id\":");
        payload.push_str(&text(self.stream_id));
        // Writing to a String cannot fail.
        let _ = write!(
            payload,
            ",\"version\":{},\"position\":{},\"event_id\":\"{}\",\"event_type\":",
            self.version, self.position, self.event_id
        );
        payload.push_str(&text(self.event_type));
        payload.push_str(",\"data\":");
        payload.push_str(self.data);
        payload.push_str(",\"metadata\":");
        payload.push_str(metadata_text);
        payload.push_str(",\"recorded_at\":\"");
        payload.push_str(&recorded_at);
        payload.push_str("\"}");
        Ok(Message {
            position: self.position,
            event_id: self.event_id,
            stream_id: self.stream_id.to_owned(),
            version: self.version,
            event_type: self.event_type.to_owned(),
            subject,
            key,
            correlation_id: ids.correlation_id,
            causation_id: ids.causation_id,
            payload: payload.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use factline_core::RecordedEvent;

    #[test]
    fn the_envelope_reads_back_as_a_recorded_event() {
        let recorded_at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let stored = StoredEvent {
            position: 9,
            stream_id: "Order-1",
            version: 2,
            event_id: Uuid::now_v7(),
            event_type: "OrderPaid",
            data: r#"{"amount_cents":5}"#,
            metadata: Some(
                r#"{"correlation_id":"c1","causation_id":"k1","schema_version":1,"headers":{"a":"b"}}"#,
            ),
            recorded_at,
        };
        let id = stored.event_id;
        let message = stored
            .into_message("factline.Order".into(), "Order-1".into())
            .unwrap();
        assert_eq!(message.correlation_id.as_deref(), Some("c1"));
        assert_eq!(message.causation_id.as_deref(), Some("k1"));
        let event: RecordedEvent = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(event.event_id, id);
        assert_eq!(event.position, 9);
        assert_eq!(event.version, 2);
        assert_eq!(event.recorded_at, recorded_at);
        assert_eq!(event.data.to_value().unwrap()["amount_cents"], 5);
        assert_eq!(event.metadata.headers["a"], "b");

        let plain = StoredEvent {
            metadata: None,
            data: "[1]",
            ..StoredEvent {
                event_id: id,
                ..stored_like(recorded_at)
            }
        };
        let message = plain.into_message("s".into(), "k".into()).unwrap();
        let event: RecordedEvent = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(event.metadata, factline_core::Metadata::default());
        assert_eq!(message.correlation_id, None);
    }

    fn stored_like(recorded_at: DateTime<Utc>) -> StoredEvent<'static> {
        StoredEvent {
            position: 1,
            stream_id: "A-1",
            version: 1,
            event_id: Uuid::nil(),
            event_type: "T",
            data: "{}",
            metadata: None,
            recorded_at,
        }
    }
}
