//! An event's data read for one event type: only the top-level fields its
//! operations use are built as JSON values; the rest is checked and
//! skipped, so a large payload costs a scan, not a tree of allocations.

use foldhash::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::expr::{Cond, Expr};
use crate::model::{Op, ReadModel};

/// The top-level data fields an event type's operations read.
#[derive(Clone, Debug, Default)]
pub(crate) struct DataFields {
    /// The data as a whole is read (`len(data)`, say).
    all: bool,
    fields: HashSet<String>,
}

impl DataFields {
    /// What `model`'s condition and `ops` (with the lookups they may use)
    /// read of an event's data.
    pub(crate) fn of(model: &ReadModel, ops: &[Op]) -> Self {
        let mut used = DataFields::default();
        if let Some(when) = &model.when {
            used.add_cond(when);
        }
        for lookup in &model.lookups {
            for (_, value) in &lookup.key {
                used.add(&value.expr);
            }
        }
        for op in ops {
            if let Some(when) = &op.when {
                used.add_cond(when);
            }
            let values = op.key.iter().chain(op.params.iter()).map(|(_, v)| v);
            for value in values.chain(op.changes.iter().map(|(_, _, v)| v)) {
                used.add(&value.expr);
            }
        }
        used
    }

    fn add(&mut self, expr: &Expr) {
        match expr {
            Expr::Data(path) => match path.first() {
                Some(field) => {
                    self.fields.insert(field.clone());
                }
                None => self.all = true,
            },
            Expr::Len(inner) => self.add(inner),
            _ => {}
        }
    }

    fn add_cond(&mut self, cond: &Cond) {
        match cond {
            Cond::Or(all) | Cond::And(all) => all.iter().for_each(|c| self.add_cond(c)),
            Cond::Not(c) => self.add_cond(c),
            Cond::Cmp(l, _, r) => {
                self.add(l);
                self.add(r);
            }
            Cond::Truthy(e) => self.add(e),
        }
    }

    /// `text` (the event's data) with only the fields read; data that is
    /// not an object is read whole. Fails as parsing the whole would.
    pub(crate) fn read(&self, text: &str) -> Result<Value, serde_json::Error> {
        if self.all {
            return serde_json::from_str(text);
        }
        let mut reader = serde_json::Deserializer::from_str(text);
        match (&mut reader).deserialize_any(FieldsVisitor(&self.fields)) {
            Ok(Some(map)) => {
                reader.end()?;
                Ok(Value::Object(map))
            }
            // Not an object: no field of it is read, but it must be JSON.
            Ok(None) | Err(_) => serde_json::from_str(text),
        }
    }
}

/// Builds an object of the wanted fields; `None` for anything else.
struct FieldsVisitor<'a>(&'a HashSet<String>);

impl<'de> Visitor<'de> for FieldsVisitor<'_> {
    type Value = Option<Map<String, Value>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = Map::new();
        while let Some(wanted) = map.next_key_seed(WantedKey(self.0))? {
            match wanted {
                Some(field) => {
                    kept.insert(field, map.next_value()?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(kept))
    }
}

/// A key, kept (as an owned string) only when it is wanted.
struct WantedKey<'a>(&'a HashSet<String>);

impl<'de> DeserializeSeed<'de> for WantedKey<'_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for WantedKey<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.contains(key).then(|| key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(names: &[&str]) -> DataFields {
        DataFields {
            all: false,
            fields: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn only_the_fields_read_are_built_and_the_rest_is_still_checked() {
        let text = r#"{"region":"eu","lines":[{"sku":"a"}],"amount":{"cents":5},"esc\"aped":1}"#;
        let read = fields(&["region", "amount", "esc\"aped"])
            .read(text)
            .unwrap();
        assert_eq!(
            read,
            serde_json::json!({"region": "eu", "amount": {"cents": 5}, "esc\"aped": 1})
        );
        assert!(fields(&["region"])
            .read(r#"{"region":"eu","lines":[1,}"#)
            .is_err());
        assert!(fields(&["region"])
            .read(r#"{"region":"eu"} trailing"#)
            .is_err());
    }

    #[test]
    fn data_that_is_not_an_object_or_read_whole_is_parsed_whole() {
        assert_eq!(
            fields(&["a"]).read("[1,2]").unwrap(),
            serde_json::json!([1, 2])
        );
        assert_eq!(fields(&["a"]).read("7").unwrap(), serde_json::json!(7));
        assert!(fields(&["a"]).read("[1,").is_err());
        let whole = DataFields {
            all: true,
            ..fields(&[])
        };
        assert_eq!(
            whole.read(r#"{"a":1,"b":2}"#).unwrap(),
            serde_json::json!({"a": 1, "b": 2})
        );
    }
}
