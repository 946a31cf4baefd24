//! Typed events and upcasting (C5): how a domain's event enum maps to stored
//! events, and how older stored shapes are lifted to the current one on
//! every typed read. Stored events are never rewritten.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::LazyLock;

use serde_json::Value;

use crate::{EventData, JsonText, Metadata, RecordedEvent};

/// Why an upcaster step could not lift the data: any error (a plain
/// message is one too), kept as the source of [`UpcastError::StepFailed`].
pub type StepError = Box<dyn std::error::Error + Send + Sync>;

/// One step of an event type's schema: the data of version `from` made into
/// the data of version `from + 1`.
pub type UpcastStep = Box<dyn Fn(Value) -> Result<Value, StepError> + Send + Sync>;

/// The upcasters of a set of event types. Each step lifts one type's data
/// from one schema version to the next; steps chain, so data stored as v1
/// reaches v3 through v1→v2 and v2→v3. A type's current version is one past
/// its newest step (1 when it has none), unless declared otherwise.
#[derive(Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), UpcastStep>,
    current: HashMap<String, u32>,
}

/// Why stored data cannot be brought to the current schema.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpcastError {
    #[error("{event_type} v{stored} cannot be read: no upcaster from v{missing} towards the current v{current}")]
    /// No upcaster leads from the stored version to the current one.
    NoPath {
        /// The event type.
        event_type: String,
        /// The schema version it was stored with.
        stored: u32,
        /// The schema version this build reads.
        current: u32,
        /// The first version with no step out of it.
        missing: u32,
    },
    #[error("{event_type} v{stored} is newer than this build, which knows up to v{current}")]
    /// The event was stored by a newer build than this one.
    FromTheFuture {
        /// The event type.
        event_type: String,
        /// The schema version it was stored with.
        stored: u32,
        /// The newest schema version this build knows.
        current: u32,
    },
    #[error("upcasting {event_type} from v{from} to v{} failed: {source}", from + 1)]
    /// An upcaster step refused the data.
    StepFailed {
        /// The event type.
        event_type: String,
        /// The version the failed step starts from.
        from: u32,
        /// What the step said.
        #[source]
        source: StepError,
    },
}

/// Why a recorded event did not become a typed event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error(transparent)]
    /// The stored version cannot be brought to the current one.
    Upcast(#[from] UpcastError),
    #[error("{event_type} v{schema_version} does not decode: {source}")]
    /// The upcast data does not deserialise as the event type.
    Json {
        /// The event type.
        event_type: String,
        /// The schema version the data was brought to.
        schema_version: u32,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
}

static NO_UPCASTERS: LazyLock<Upcasters> = LazyLock::new(Upcasters::default);

impl Upcasters {
    /// No upcasters: every event must be at its type's current version.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set, for types that never changed.
    pub fn none() -> &'static Upcasters {
        &NO_UPCASTERS
    }

    /// Adds the step that lifts `event_type` data from version `from` to
    /// `from + 1`.
    /// The step fails with any error (`?` converts one), or a message
    /// (`Err("why".into())`).
    pub fn step(
        mut self,
        event_type: impl Into<String>,
        from: u32,
        step: impl Fn(Value) -> Result<Value, StepError> + Send + Sync + 'static,
    ) -> Self {
        let event_type = event_type.into();
        let current = self.current.entry(event_type.clone()).or_insert(1);
        *current = (*current).max(from + 1);
        self.steps.insert((event_type, from), Box::new(step));
        self
    }

    /// Declares the current version of a type outright (for a type first
    /// stored at a version above 1, or whose old steps were retired).
    pub fn current(mut self, event_type: impl Into<String>, version: u32) -> Self {
        self.current.insert(event_type.into(), version);
        self
    }

    /// The schema version this build writes for `event_type`.
    pub fn current_version(&self, event_type: &str) -> u32 {
        self.current.get(event_type).copied().unwrap_or(1)
    }

    /// `data`, stored at `stored` version, as the current version's data.
    pub fn upcast<'a>(
        &self,
        event_type: &str,
        stored: u32,
        data: &'a Value,
    ) -> Result<Cow<'a, Value>, UpcastError> {
        let current = self.current_version(event_type);
        if stored == current {
            return Ok(Cow::Borrowed(data));
        }
        if stored > current {
            return Err(UpcastError::FromTheFuture {
                event_type: event_type.to_owned(),
                stored,
                current,
            });
        }
        // Check the whole path before running any step.
        let key = |from: u32| (event_type.to_owned(), from);
        if let Some(missing) = (stored..current).find(|&v| !self.steps.contains_key(&key(v))) {
            return Err(UpcastError::NoPath {
                event_type: event_type.to_owned(),
                stored,
                current,
                missing,
            });
        }
        let mut value = data.clone();
        for from in stored..current {
            let step = &self.steps[&key(from)];
            value = step(value).map_err(|source| UpcastError::StepFailed {
                event_type: event_type.to_owned(),
                from,
                source,
            })?;
        }
        Ok(Cow::Owned(value))
    }
}

/// An event of a domain as its code sees it, with its stored form.
pub trait DomainEvent: Sized + Send + Sync + 'static {
    /// The stored event type and JSON data of this event, in the current
    /// schema.
    fn encode(&self) -> Result<(String, JsonText), serde_json::Error>;

    /// Rebuilds an event from its stored type and current-schema data.
    fn decode(event_type: &str, data: &Value) -> Result<Self, serde_json::Error>;

    /// The steps from older schemas of these events to the current ones.
    fn upcasters() -> &'static Upcasters {
        Upcasters::none()
    }

    /// The event ready to append: its type, data, and the schema version
    /// it is written in (in the metadata, with `metadata`'s other fields).
    fn to_event_data(&self, metadata: Metadata) -> Result<EventData, serde_json::Error> {
        let (event_type, data) = self.encode()?;
        let schema_version = Self::upcasters().current_version(&event_type);
        Ok(EventData::new(event_type, data).with_metadata(Metadata {
            schema_version,
            ..metadata
        }))
    }

    /// A stored event as this type: upcast from the schema version it was
    /// stored in, then decoded. Every typed read goes through here.
    fn from_recorded(event: &RecordedEvent) -> Result<Self, DecodeError> {
        let stored = event.metadata.schema_version;
        let value = event.data.to_value().map_err(|source| DecodeError::Json {
            event_type: event.event_type.clone(),
            schema_version: stored,
            source,
        })?;
        let data = Self::upcasters().upcast(&event.event_type, stored, &value)?;
        Self::decode(&event.event_type, &data).map_err(|source| DecodeError::Json {
            event_type: event.event_type.clone(),
            schema_version: Self::upcasters().current_version(&event.event_type),
            source,
        })
    }
}

/// [`DomainEvent`] for enums serialised by serde as
/// `#[serde(tag = "type", content = "data")]`: the tag is the stored event
/// type and the content its data.
pub mod tagged {
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use serde_json::{Map, Value};

    use crate::JsonText;

    /// The event type and data of a `#[serde(tag = "type", content = "data")]` enum value.
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

    /// The enum value of a stored type and data, the inverse of [`encode`].
    pub fn decode<E: DeserializeOwned>(
        event_type: &str,
        data: &Value,
    ) -> Result<E, serde_json::Error> {
        use serde::de::value::MapDeserializer;
        // Read in place through a two-entry map, so the data is not copied
        // (decoding runs for every event a projection or aggregate reads).
        let tag = Value::String(event_type.to_owned());
        let tagged = [("type", &tag), ("data", data)];
        match E::deserialize(MapDeserializer::new(tagged.into_iter())) {
            // A unit variant has no "data" in its serde form; it is stored
            // with `{}`.
            Err(_) if matches!(data, Value::Object(map) if map.is_empty()) => {
                E::deserialize(MapDeserializer::new([("type", &tag)].into_iter()))
            }
            decoded => decoded,
        }
    }
}

/// Implements [`DomainEvent`] for an enum serialised with
/// `#[serde(tag = "type", content = "data")]`: each variant's name is the
/// stored event type and its fields the data. Name the upcasters with
/// `upcasters = …` when the events' schema changed.
///
/// ```
/// use factline_core::{tagged_events, DomainEvent, Upcasters};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// #[serde(tag = "type", content = "data")]
/// enum TicketEvent {
///     TicketOpened { title: String },
///     TicketClosed,
/// }
/// tagged_events!(TicketEvent);
///
/// let (event_type, data) = TicketEvent::TicketOpened { title: "Printer".into() }.encode().unwrap();
/// assert_eq!((event_type.as_str(), data.as_str()), ("TicketOpened", r#"{"title":"Printer"}"#));
/// let back = TicketEvent::decode("TicketClosed", &serde_json::Value::Null).unwrap();
/// assert_eq!(back, TicketEvent::TicketClosed);
///
/// // With upcasters: a static set, built once.
/// static INVOICE_UPCASTERS: std::sync::LazyLock<Upcasters> = std::sync::LazyLock::new(|| {
///     Upcasters::new().step("InvoiceIssued", 1, |mut data| {
///         data["currency"] = "EUR".into();
///         Ok(data)
///     })
/// });
/// #[derive(Debug, Serialize, Deserialize)]
/// #[serde(tag = "type", content = "data")]
/// enum InvoiceEvent {
///     InvoiceIssued { cents: u64, currency: String },
/// }
/// tagged_events!(InvoiceEvent, upcasters = &INVOICE_UPCASTERS);
/// assert_eq!(InvoiceEvent::upcasters().current_version("InvoiceIssued"), 2);
/// ```
#[macro_export]
macro_rules! tagged_events {
    ($event:ty) => {
        $crate::tagged_events!($event, upcasters = $crate::Upcasters::none());
    };
    ($event:ty, upcasters = $upcasters:expr) => {
        impl $crate::DomainEvent for $event {
            fn encode(
                &self,
            ) -> ::std::result::Result<
                (::std::string::String, $crate::JsonText),
                $crate::__private::serde_json::Error,
            > {
                $crate::tagged::encode(self)
            }
            fn decode(
                event_type: &str,
                data: &$crate::__private::serde_json::Value,
            ) -> ::std::result::Result<Self, $crate::__private::serde_json::Error> {
                $crate::tagged::decode(event_type, data)
            }
            fn upcasters() -> &'static $crate::Upcasters {
                $upcasters
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chain() -> Upcasters {
        Upcasters::new()
            .step("Placed", 1, |mut v| {
                let total = v.as_object_mut().and_then(|o| o.remove("total"));
                v["amount"] = total.ok_or("no total")?;
                Ok(v)
            })
            .step("Placed", 2, |mut v| {
                let amount = v["amount"].as_f64().ok_or("amount is not a number")?;
                v["amount_cents"] = json!((amount * 100.0).round() as i64);
                v.as_object_mut().map(|o| o.remove("amount"));
                Ok(v)
            })
    }

    #[test]
    fn steps_chain_to_the_current_version() {
        let up = chain();
        assert_eq!(up.current_version("Placed"), 3);
        assert_eq!(up.current_version("Shipped"), 1);
        let v1 = json!({"total": 12.5});
        assert_eq!(
            up.upcast("Placed", 1, &v1).unwrap().into_owned(),
            json!({"amount_cents": 1250})
        );
        let v2 = json!({"amount": 1.0});
        assert_eq!(
            up.upcast("Placed", 2, &v2).unwrap().into_owned(),
            json!({"amount_cents": 100})
        );
        let v3 = json!({"amount_cents": 7});
        assert!(matches!(up.upcast("Placed", 3, &v3), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn missing_future_and_failing_steps_name_type_and_versions() {
        let gap = Upcasters::new().step("Placed", 2, Ok);
        let err = gap.upcast("Placed", 1, &json!({})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Placed v1 cannot be read: no upcaster from v1 towards the current v3"
        );
        let err = chain().upcast("Placed", 4, &json!({})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Placed v4 is newer than this build, which knows up to v3"
        );
        let err = chain()
            .upcast("Placed", 2, &json!({"amount": "x"}))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "upcasting Placed from v2 to v3 failed: amount is not a number"
        );
        let declared = Upcasters::new().current("Shipped", 2);
        assert!(matches!(
            declared.upcast("Shipped", 1, &json!({})),
            Err(UpcastError::NoPath { missing: 1, .. })
        ));
    }

    #[test]
    fn a_failed_step_keeps_its_error_as_the_source() {
        let upcasters = Upcasters::new().step("Paid", 1, |v| {
            let cents: u64 = v["cents"].as_str().ok_or("no cents")?.parse()?;
            Ok(serde_json::json!({ "cents": cents }))
        });
        let failed = upcasters
            .upcast("Paid", 1, &serde_json::json!({ "cents": "12x" }))
            .unwrap_err();
        assert!(
            matches!(&failed, UpcastError::StepFailed { from: 1, .. }),
            "{failed:?}"
        );
        let source = std::error::Error::source(&failed).expect("the step's error");
        assert!(source.is::<std::num::ParseIntError>(), "{source:?}");
        // A message is an error too.
        let missing = upcasters
            .upcast("Paid", 1, &serde_json::json!({}))
            .unwrap_err();
        assert!(
            missing.to_string().ends_with("failed: no cents"),
            "{missing}"
        );
    }
}
