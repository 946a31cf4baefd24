use factline_core::JsonText;
use serde_json::Value;

/// An event of an aggregate as the domain sees it, with its stored form.
pub trait DomainEvent: Sized + Send + Sync + 'static {
    /// The stored event type and JSON data of this event.
    fn encode(&self) -> Result<(String, JsonText), serde_json::Error>;
    /// Rebuilds an event from its stored type and data.
    fn decode(event_type: &str, data: &Value) -> Result<Self, serde_json::Error>;
}

/// A consistency boundary: state folded from its own stream's events, and
/// the rules that decide what a command does to it.
///
/// `decide` only looks at the state and the command: every rule is checked
/// before any event exists, so a rejected command emits nothing, and no rule
/// can depend on a read model.
pub trait Aggregate: Default + Send + Sync + 'static {
    /// The aggregate with id `x` lives in stream `<CATEGORY>-x`.
    const CATEGORY: &'static str;
    type Event: DomainEvent;
    type Command: Send + Sync;
    /// A business rejection (not an infrastructure failure).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Folds one event into the state. Events are facts: this never fails.
    fn apply(&mut self, event: &Self::Event);

    /// The events `command` produces from this state, or why it is refused.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
}

/// [`DomainEvent`] for enums serialised by serde as
/// `#[serde(tag = "type", content = "data")]`: the tag is the stored event
/// type and the content its data.
pub mod tagged {
    use factline_core::JsonText;
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use serde_json::{Map, Value};

    pub fn encode<E: Serialize>(event: &E) -> Result<(String, JsonText), serde_json::Error> {
        use serde::ser::Error;
        let Value::Object(mut fields) = serde_json::to_value(event)? else {
            return Err(serde_json::Error::custom(
                "a tagged event serialises to an object with \"type\" and \"data\"",
            ));
        };
        let Some(Value::String(event_type)) = fields.remove("type") else {
            return Err(serde_json::Error::custom(
                "a tagged event needs a string \"type\"",
            ));
        };
        let data = fields
            .remove("data")
            .unwrap_or_else(|| Value::Object(Map::new()));
        Ok((event_type, JsonText::from(data)))
    }

    pub fn decode<E: DeserializeOwned>(
        event_type: &str,
        data: &Value,
    ) -> Result<E, serde_json::Error> {
        let mut fields = Map::with_capacity(2);
        fields.insert("type".into(), Value::String(event_type.to_owned()));
        fields.insert("data".into(), data.clone());
        match serde_json::from_value(Value::Object(fields.clone())) {
            // A unit variant has no "data" in its serde form; it is stored
            // with `{}`.
            Err(_) if matches!(data, Value::Object(map) if map.is_empty()) => {
                fields.remove("data");
                serde_json::from_value(Value::Object(fields))
            }
            decoded => decoded,
        }
    }
}
