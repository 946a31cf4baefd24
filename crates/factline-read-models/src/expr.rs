//! Values and conditions: what an operation takes from an event
//! (`data.amount`, `entity_id`, `recorded_day`, `'paid'`, `len(data.lines)`)
//! and when it runs (`data.refund_cents > 0 and metadata.tenant == 'acme'`).
//! Parsed once when the file is read, evaluated per event.

use std::fmt;

use factline_core::RecordedEvent;
use serde_json::Value;

/// The type of a column or of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnType {
    /// Text.
    Text,
    /// A 64-bit whole number.
    Integer,
    /// A 64-bit floating-point number.
    Real,
}

impl ColumnType {
    pub(crate) fn parse(name: &str) -> Option<ColumnType> {
        match name {
            "text" => Some(ColumnType::Text),
            "integer" => Some(ColumnType::Integer),
            "real" => Some(ColumnType::Real),
            _ => None,
        }
    }

    /// Its name in the definitions file.
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Integer => "integer",
            ColumnType::Real => "real",
        }
    }

    /// The SQL type both SQLite and PostgreSQL know.
    pub(crate) fn sql(self) -> &'static str {
        match self {
            ColumnType::Text => "TEXT",
            ColumnType::Integer => "BIGINT",
            ColumnType::Real => "DOUBLE PRECISION",
        }
    }
}

/// A value computed from an event (or a constant).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Real(f64),
    Text(String),
    /// An object or array of the event's data.
    Json(Value),
}

impl Val {
    pub(crate) fn from_json(value: &Value) -> Val {
        match value {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Val::Int(i),
                None => Val::Real(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Val::Text(s.clone()),
            other => Val::Json(other.clone()),
        }
    }

    pub(crate) fn from_toml(value: &toml::Value) -> Option<Val> {
        Some(match value {
            toml::Value::String(s) => Val::Text(s.clone()),
            toml::Value::Integer(i) => Val::Int(*i),
            toml::Value::Float(f) => Val::Real(*f),
            toml::Value::Boolean(b) => Val::Bool(*b),
            _ => return None,
        })
    }

    /// What kind of value it is, for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Val::Null => "null",
            Val::Bool(_) => "a boolean",
            Val::Int(_) => "an integer",
            Val::Real(_) => "a number with a fraction",
            Val::Text(_) => "text",
            Val::Json(Value::Array(_)) => "an array",
            Val::Json(_) => "an object",
        }
    }

    fn truthy(&self) -> bool {
        match self {
            Val::Null => false,
            Val::Bool(b) => *b,
            Val::Int(i) => *i != 0,
            Val::Real(f) => *f != 0.0,
            Val::Text(s) => !s.is_empty(),
            Val::Json(_) => true,
        }
    }
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Null => f.write_str("null"),
            Val::Bool(b) => write!(f, "{b}"),
            Val::Int(i) => write!(f, "{i}"),
            Val::Real(r) => write!(f, "{r}"),
            Val::Text(s) => write!(f, "{s:?}"),
            Val::Json(v) => write!(f, "{v}"),
        }
    }
}

/// Where a value comes from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Expr {
    Const(Val),
    /// A path into the event's data: `data.customer.id`, `data.lines.0`.
    Data(Vec<String>),
    /// `metadata.correlation_id`, `metadata.headers.tenant`, …
    Metadata(Vec<String>),
    StreamId,
    /// The part of the stream id after the category's `-`.
    EntityId,
    Category,
    EventType,
    EventId,
    Version,
    Position,
    RecordedAt,
    RecordedDay,
    RecordedHour,
    /// The number of elements of an array (or keys of an object).
    Len(Box<Expr>),
    /// A value remembered in a table (`lookup.<name>`), read by the SQL.
    Lookup(String),
}

/// The built-in values, for documentation and error messages.
pub(crate) const BUILT_INS: &[&str] = &[
    "stream_id",
    "entity_id",
    "category",
    "event_type",
    "event_id",
    "version",
    "position",
    "recorded_at",
    "recorded_day",
    "recorded_hour",
];

impl Expr {
    /// The type it always has, where that is known before any event.
    pub(crate) fn static_type(&self) -> Option<ColumnType> {
        match self {
            Expr::Const(Val::Int(_) | Val::Bool(_)) => Some(ColumnType::Integer),
            Expr::Const(Val::Real(_)) => Some(ColumnType::Real),
            Expr::Const(Val::Text(_)) => Some(ColumnType::Text),
            Expr::Version | Expr::Position | Expr::Len(_) => Some(ColumnType::Integer),
            Expr::StreamId
            | Expr::EntityId
            | Expr::Category
            | Expr::EventType
            | Expr::EventId
            | Expr::RecordedAt
            | Expr::RecordedDay
            | Expr::RecordedHour => Some(ColumnType::Text),
            Expr::Metadata(path) => match path.first().map(String::as_str) {
                Some("schema_version") => Some(ColumnType::Integer),
                Some(_) => Some(ColumnType::Text),
                None => None,
            },
            _ => None,
        }
    }

    /// Its value for `event` (whose data is `data`); lookups are the SQL's
    /// to read and give null here.
    pub(crate) fn eval(&self, event: &RecordedEvent, data: &Value) -> Val {
        match self {
            Expr::Const(v) => v.clone(),
            Expr::Data(path) => {
                let mut at = data;
                for step in path {
                    let next = match at {
                        Value::Object(map) => map.get(step),
                        Value::Array(items) => {
                            step.parse::<usize>().ok().and_then(|i| items.get(i))
                        }
                        _ => None,
                    };
                    match next {
                        Some(v) => at = v,
                        None => return Val::Null,
                    }
                }
                Val::from_json(at)
            }
            Expr::Metadata(path) => {
                let m = &event.metadata;
                let text = |v: &Option<String>| v.clone().map_or(Val::Null, Val::Text);
                match path.as_slice() {
                    [field] if field == "correlation_id" => text(&m.correlation_id),
                    [field] if field == "causation_id" => text(&m.causation_id),
                    [field] if field == "schema_version" => Val::Int(i64::from(m.schema_version)),
                    [headers, name] if headers == "headers" => {
                        text(&m.headers.get(name.as_str()).cloned())
                    }
                    _ => Val::Null,
                }
            }
            Expr::StreamId => Val::Text(event.stream_id.to_string()),
            Expr::EntityId => Val::Text(
                event
                    .stream_id
                    .as_str()
                    .split_once('-')
                    .map_or("", |(_, id)| id)
                    .to_owned(),
            ),
            Expr::Category => Val::Text(event.stream_id.category().to_owned()),
            Expr::EventType => Val::Text(event.event_type.clone()),
            Expr::EventId => Val::Text(event.event_id.to_string()),
            Expr::Version => Val::Int(i64::try_from(event.version).unwrap_or(i64::MAX)),
            Expr::Position => Val::Int(i64::try_from(event.position).unwrap_or(i64::MAX)),
            Expr::RecordedAt => Val::Text(
                event
                    .recorded_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
            Expr::RecordedDay => Val::Text(day_of(event, false)),
            Expr::RecordedHour => Val::Text(day_of(event, true)),
            Expr::Len(inner) => match inner.eval(event, data) {
                Val::Json(Value::Array(items)) => Val::Int(items.len() as i64),
                Val::Json(Value::Object(map)) => Val::Int(map.len() as i64),
                Val::Text(s) => Val::Int(s.chars().count() as i64),
                _ => Val::Null,
            },
            Expr::Lookup(_) => Val::Null,
        }
    }

    /// The lookup it reads, if any.
    pub(crate) fn lookup(&self) -> Option<&str> {
        match self {
            Expr::Lookup(name) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Const(Val::Text(s)) => write!(f, "'{}'", s.replace('\'', "''")),
            Expr::Const(v) => write!(f, "{v}"),
            Expr::Data(path) => write!(f, "data.{}", path.join(".")),
            Expr::Metadata(path) => write!(f, "metadata.{}", path.join(".")),
            Expr::Len(inner) => write!(f, "len({inner})"),
            Expr::Lookup(name) => write!(f, "lookup.{name}"),
            other => {
                let name = match other {
                    Expr::StreamId => "stream_id",
                    Expr::EntityId => "entity_id",
                    Expr::Category => "category",
                    Expr::EventType => "event_type",
                    Expr::EventId => "event_id",
                    Expr::Version => "version",
                    Expr::Position => "position",
                    Expr::RecordedAt => "recorded_at",
                    Expr::RecordedDay => "recorded_day",
                    _ => "recorded_hour",
                };
                f.write_str(name)
            }
        }
    }
}

/// `YYYY-MM-DD` (and `THH:00`) of the event's time in UTC; written by
/// hand, as a batch does it for most events.
fn day_of(event: &RecordedEvent, with_hour: bool) -> String {
    use chrono::{Datelike, Timelike};
    use std::fmt::Write;
    let at = event.recorded_at;
    let mut day = String::with_capacity(16);
    let _ = write!(day, "{:04}-{:02}-{:02}", at.year(), at.month(), at.day());
    if with_hour {
        let _ = write!(day, "T{:02}:00", at.hour());
    }
    day
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A condition on an event.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Cond {
    Or(Vec<Cond>),
    And(Vec<Cond>),
    Not(Box<Cond>),
    Cmp(Expr, CmpOp, Expr),
    Truthy(Expr),
}

impl Cond {
    pub(crate) fn holds(&self, event: &RecordedEvent, data: &Value) -> bool {
        match self {
            Cond::Or(all) => all.iter().any(|c| c.holds(event, data)),
            Cond::And(all) => all.iter().all(|c| c.holds(event, data)),
            Cond::Not(c) => !c.holds(event, data),
            Cond::Truthy(e) => e.eval(event, data).truthy(),
            Cond::Cmp(l, op, r) => compare(&l.eval(event, data), *op, &r.eval(event, data)),
        }
    }
}

/// Null equals only null and is neither smaller nor larger than anything;
/// numbers compare as numbers; values of different kinds are unequal.
fn compare(l: &Val, op: CmpOp, r: &Val) -> bool {
    use std::cmp::Ordering;
    let ordering: Option<Ordering> = match (l, r) {
        (Val::Null, Val::Null) => Some(Ordering::Equal),
        (Val::Null, _) | (_, Val::Null) => None,
        (Val::Int(a), Val::Int(b)) => Some(a.cmp(b)),
        (Val::Int(a), Val::Real(b)) => (*a as f64).partial_cmp(b),
        (Val::Real(a), Val::Int(b)) => a.partial_cmp(&(*b as f64)),
        (Val::Real(a), Val::Real(b)) => a.partial_cmp(b),
        (Val::Text(a), Val::Text(b)) => Some(a.cmp(b)),
        (Val::Bool(a), Val::Bool(b)) => Some(a.cmp(b)),
        (a, b) => (a == b).then_some(Ordering::Equal),
    };
    match (op, ordering) {
        (CmpOp::Eq, o) => o == Some(Ordering::Equal),
        (CmpOp::Ne, o) => o != Some(Ordering::Equal),
        (_, None) => false,
        (CmpOp::Lt, Some(o)) => o == Ordering::Less,
        (CmpOp::Le, Some(o)) => o != Ordering::Greater,
        (CmpOp::Gt, Some(o)) => o == Ordering::Greater,
        (CmpOp::Ge, Some(o)) => o != Ordering::Less,
    }
}

mod parse;

pub(crate) use parse::{parse_condition, parse_value};

#[cfg(test)]
mod tests {
    use super::*;
    use factline_core::{JsonText, Metadata, StreamId};
    use serde_json::json;

    fn event(data: Value) -> RecordedEvent {
        RecordedEvent {
            stream_id: StreamId::new("Invoice-2026-7").unwrap(),
            version: 3,
            position: 42,
            event_id: uuid::Uuid::nil(),
            event_type: "InvoicePaid".into(),
            data: JsonText::encode(&data).unwrap(),
            metadata: Metadata {
                correlation_id: Some("c-1".into()),
                headers: [("tenant".to_owned(), "acme".to_owned())].into(),
                ..Metadata::default()
            },
            recorded_at: "2026-12-07T15:42:10Z".parse().unwrap(),
        }
    }

    fn value_of(text: &str, data: Value) -> Val {
        let e = event(data.clone());
        parse_value(text).unwrap().eval(&e, &data)
    }

    #[test]
    fn values_come_from_the_event_its_data_and_metadata() {
        let data =
            json!({"cents": 1200, "customer": {"id": "c7"}, "lines": [{"sku": "a"}, {"sku": "b"}]});
        assert_eq!(value_of("data.cents", data.clone()), Val::Int(1200));
        assert_eq!(
            value_of("data.customer.id", data.clone()),
            Val::Text("c7".into())
        );
        assert_eq!(
            value_of("data.lines.1.sku", data.clone()),
            Val::Text("b".into())
        );
        assert_eq!(value_of("len(data.lines)", data.clone()), Val::Int(2));
        assert_eq!(value_of("data.missing.deeper", data.clone()), Val::Null);
        assert_eq!(
            value_of("entity_id", data.clone()),
            Val::Text("2026-7".into())
        );
        assert_eq!(
            value_of("category", data.clone()),
            Val::Text("Invoice".into())
        );
        assert_eq!(value_of("position", data.clone()), Val::Int(42));
        assert_eq!(
            value_of("recorded_day", data.clone()),
            Val::Text("2026-12-07".into())
        );
        assert_eq!(
            value_of("recorded_hour", data.clone()),
            Val::Text("2026-12-07T15:00".into())
        );
        assert_eq!(
            value_of("metadata.headers.tenant", data.clone()),
            Val::Text("acme".into())
        );
        assert_eq!(
            value_of("metadata.correlation_id", data.clone()),
            Val::Text("c-1".into())
        );
        assert_eq!(value_of("'it''s'", data), Val::Text("it's".into()));
    }

    #[test]
    fn conditions_compare_numbers_as_numbers_and_null_with_nothing() {
        let data = json!({"cents": 1200, "refund": 0, "kind": "priority", "ratio": 0.5});
        let e = event(data.clone());
        let holds = |text: &str| parse_condition(text).unwrap().holds(&e, &data);
        assert!(holds("data.cents > 1000 and data.kind == 'priority'"));
        assert!(!holds("data.refund > 0"));
        assert!(holds("data.ratio < 1"));
        assert!(holds("data.refund > 0 or metadata.headers.tenant = 'acme'"));
        assert!(holds("not (data.refund > 0)"));
        assert!(
            !holds("data.absent > 0"),
            "null is not larger than anything"
        );
        assert!(!holds("data.absent < 0"), "nor smaller");
        assert!(holds("data.absent == null"));
        assert!(holds("data.absent != 0"));
        assert!(holds("data.kind"));
        assert!(!holds("data.refund"));
    }

    #[test]
    fn bad_expressions_say_what_and_where() {
        let bad = parse_value("data.cents +").unwrap_err();
        assert_eq!(bad.offset, 11);
        assert!(bad.message.contains("unexpected"), "{}", bad.message);
        let bad = parse_value("amount").unwrap_err();
        assert!(
            bad.message.contains("unknown value \"amount\""),
            "{}",
            bad.message
        );
        let bad = parse_condition("data.a > 1 data.b").unwrap_err();
        assert_eq!(bad.offset, 11);
        let bad = parse_condition("lookup.region == 'eu'").unwrap_err();
        assert!(
            bad.message.contains("cannot read a lookup"),
            "{}",
            bad.message
        );
        let bad = parse_value("'open").unwrap_err();
        assert!(bad.message.contains("not closed"), "{}", bad.message);
        let bad = parse_value("metadata.tenant").unwrap_err();
        assert!(bad.message.contains("headers.<name>"), "{}", bad.message);
    }
}
