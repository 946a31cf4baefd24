use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{JsonText, StreamId};

/// Metadata carried by every event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Shared by everything one business transaction caused.
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// The id of the command or event that directly caused this one.
    #[serde(default)]
    pub causation_id: Option<String>,
    /// The version of the event type's schema this payload follows.
    #[serde(default = "first_schema_version", deserialize_with = "whole_u32")]
    pub schema_version: u32,
    /// Free-form string headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn first_schema_version() -> u32 {
    1
}

/// A `u32` written as an integer or as a float with no fraction (`2.0`):
/// JSON does not tell them apart, and clients in many languages write the
/// second.
fn whole_u32<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    use serde::de::Error;
    let number = serde_json::Number::deserialize(deserializer)?;
    let whole = match (number.as_u64(), number.as_f64()) {
        (Some(n), _) => Some(n),
        (None, Some(f)) if f.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&f) => {
            Some(f as u64)
        }
        _ => None,
    };
    whole.and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
        D::Error::custom(format!(
            "schema_version must be a whole number from 0 to {}, not {number}",
            u32::MAX
        ))
    })
}

impl Default for Metadata {
    fn default() -> Self {
        Metadata {
            correlation_id: None,
            causation_id: None,
            schema_version: first_schema_version(),
            headers: BTreeMap::new(),
        }
    }
}

/// An event to append. The JSON form is
/// `{"event_id"?, "type", "data"?, "metadata"?}`; a missing `event_id` gets a
/// fresh one from [`new_event_id`], a missing `data` is `{}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventData {
    /// The event's id: given by the caller to make a retry idempotent, or new.
    #[serde(default = "new_event_id")]
    pub event_id: Uuid,
    /// The event's type, such as `InvoiceIssued`.
    #[serde(rename = "type", alias = "event_type")]
    pub event_type: String,
    /// The event's data: any JSON value.
    #[serde(default = "JsonText::empty_object")]
    pub data: JsonText,
    /// Correlation and causation ids and custom fields.
    #[serde(default)]
    pub metadata: Metadata,
}

/// A fresh event id. Version 7 UUIDs start with a timestamp, so ids made
/// close together sort close together and the store's event-id index grows
/// at its end instead of being rewritten all over on every commit.
pub fn new_event_id() -> Uuid {
    Uuid::now_v7()
}

impl EventData {
    /// A new event with a fresh event id and default metadata. `data` is a
    /// [`serde_json::Value`] or [`JsonText`].
    pub fn new(event_type: impl Into<String>, data: impl Into<JsonText>) -> Self {
        EventData {
            event_id: new_event_id(),
            event_type: event_type.into(),
            data: data.into(),
            metadata: Metadata::default(),
        }
    }

    /// Sets the event id, so that retrying the append is idempotent.
    pub fn with_event_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// The stream the event belongs to.
    pub stream_id: StreamId,
    /// 1-based position of the event within its stream.
    pub version: u64,
    /// Global position in `$all`, starting at 1.
    pub position: u64,
    /// The event's id.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// The data as stored: see [`JsonText`] for typed access.
    pub data: JsonText,
    /// Correlation and causation ids and custom fields.
    pub metadata: Metadata,
    /// When the event was committed.
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// The bytes of its stored JSON text (data, and metadata when not the
    /// default): what a read budget counts.
    pub fn text_len(&self) -> usize {
        let metadata = if self.metadata == Metadata::default() {
            0
        } else {
            // Small and typed: its fields' lengths stand for its text.
            self.metadata.correlation_id.as_ref().map_or(0, String::len)
                + self.metadata.causation_id.as_ref().map_or(0, String::len)
                + self
                    .metadata
                    .headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
        };
        self.data.as_str().len() + self.event_type.len() + metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_defaults_and_strictness() {
        let e: EventData = serde_json::from_str(r#"{"type":"OrderPlaced"}"#).unwrap();
        assert_eq!(e.data.to_value().unwrap(), serde_json::json!({}));
        assert_eq!(e.metadata.schema_version, 1);
        assert!(serde_json::from_str::<EventData>(r#"{"type":"X","dta":{}}"#).is_err());
        assert!(serde_json::from_str::<EventData>(r#"{"data":{}}"#).is_err());
        assert!(serde_json::from_str::<Metadata>(r#"{"correlationId":"x"}"#).is_err());
        for (text, version) in [
            ("2", Some(2)),
            ("3.0", Some(3)),
            ("1.5", None),
            ("-1", None),
            ("4294967296", None),
        ] {
            let parsed =
                serde_json::from_str::<Metadata>(&format!(r#"{{"schema_version":{text}}}"#));
            assert_eq!(parsed.ok().map(|m| m.schema_version), version, "{text}");
        }
    }
}
