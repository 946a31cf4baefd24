use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use uuid::Uuid;

use crate::StreamId;

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
    #[serde(default = "first_schema_version")]
    pub schema_version: u32,
    /// Free-form string headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn first_schema_version() -> u32 {
    1
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

/// JSON text, checked when it is made. Events to append carry their data
/// as text: callers that hold JSON text already (the HTTP server, the CLI,
/// typed events serialised once) hand it over without a parse and a
/// re-serialisation, and the store writes it as it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JsonText(Box<RawValue>);

impl JsonText {
    /// Checks `text` and keeps it (without surrounding whitespace).
    pub fn parse(text: impl Into<String>) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text.into()).map(JsonText)
    }

    /// Serialises `value` straight to text, with no [`Value`] in between.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(JsonText)
    }

    /// The empty object, `{}`.
    pub fn empty_object() -> Self {
        JsonText(RawValue::from_string("{}".to_owned()).expect("{} is JSON"))
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The text parsed into a [`Value`].
    pub fn to_value(&self) -> Value {
        // The text was checked when it was made, so it parses.
        serde_json::from_str(self.as_str()).expect("JsonText holds valid JSON")
    }
}

impl From<Value> for JsonText {
    fn from(value: Value) -> Self {
        JsonText::from(&value)
    }
}

impl From<&Value> for JsonText {
    fn from(value: &Value) -> Self {
        // A Value has string keys and finite numbers only, so it serialises.
        JsonText::encode(value).expect("a Value always serialises")
    }
}

/// Equal when the texts are equal (`{"a":1}` and `{ "a": 1 }` are not).
impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl std::fmt::Display for JsonText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event to append. The JSON form is
/// `{"event_id"?, "type", "data"?, "metadata"?}`; a missing `event_id` gets a
/// fresh one from [`new_event_id`], a missing `data` is `{}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventData {
    #[serde(default = "new_event_id")]
    pub event_id: Uuid,
    #[serde(rename = "type", alias = "event_type")]
    pub event_type: String,
    #[serde(default = "JsonText::empty_object")]
    pub data: JsonText,
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
    /// [`Value`] or [`JsonText`].
    pub fn new(event_type: impl Into<String>, data: impl Into<JsonText>) -> Self {
        EventData {
            event_id: new_event_id(),
            event_type: event_type.into(),
            data: data.into(),
            metadata: Metadata::default(),
        }
    }

    pub fn with_event_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }

    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub stream_id: StreamId,
    /// 1-based position of the event within its stream.
    pub version: u64,
    /// Global position in `$all`, starting at 1.
    pub position: u64,
    pub event_id: Uuid,
    pub event_type: String,
    pub data: Value,
    pub metadata: Metadata,
    pub recorded_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_defaults_and_strictness() {
        let e: EventData = serde_json::from_str(r#"{"type":"OrderPlaced"}"#).unwrap();
        assert_eq!(e.data.to_value(), serde_json::json!({}));
        assert_eq!(e.metadata.schema_version, 1);
        assert!(serde_json::from_str::<EventData>(r#"{"type":"X","dta":{}}"#).is_err());
        assert!(serde_json::from_str::<EventData>(r#"{"data":{}}"#).is_err());
        assert!(serde_json::from_str::<Metadata>(r#"{"correlationId":"x"}"#).is_err());
    }

    #[test]
    fn event_data_keeps_its_json_text_as_given() {
        let line = r#"{"type":"X","data": {"b":1, "a":[1.50, "\u0000"]} }"#;
        let e: EventData = serde_json::from_str(line).unwrap();
        assert_eq!(e.data.as_str(), r#"{"b":1, "a":[1.50, "\u0000"]}"#);
        assert_eq!(
            e.data.to_value(),
            serde_json::json!({"b":1, "a":[1.5, "\u{0}"]})
        );
        assert!(JsonText::parse(" [1, 2] ").is_ok_and(|j| j.as_str() == "[1, 2]"));
        for bad in ["", "{", "[1,]", "{\"a\":1} x", "nul"] {
            assert!(JsonText::parse(bad).is_err(), "{bad:?} was taken as JSON");
        }
        let typed = JsonText::encode(&std::collections::BTreeMap::from([("k", 2)])).unwrap();
        assert_eq!(typed.as_str(), r#"{"k":2}"#);
        assert_eq!(JsonText::from(serde_json::json!([true])).as_str(), "[true]");
    }
}
