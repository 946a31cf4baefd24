//! JSON text as events carry it, and the rule for what the store accepts.

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// JSON text, checked for syntax when it is made. Events carry their data
/// as text both ways: callers that hold JSON text already (the HTTP server,
/// the CLI, typed events serialised once) hand it over without a parse and a
/// re-serialisation, the store writes it as it is, and reads hand back the
/// stored text so that HTTP, the CLI and subscriptions pass it through.
///
/// Syntax is all a `JsonText` promises: turning it into a [`Value`] or a
/// typed value ([`JsonText::to_value`], [`JsonText::decode`]) can fail, for
/// example on a number out of `f64` range in an event that an earlier
/// version stored. Appends accept only text that does decode (see
/// [`check_readable`]).
#[derive(Clone, Debug)]
pub struct JsonText {
    raw: Box<RawValue>,
    /// Made from a [`Value`]: its strings are Rust strings and its numbers
    /// finite, so only its nesting can be unreadable.
    serialised: bool,
}

impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(|raw| JsonText {
            raw,
            serialised: false,
        })
    }
}

impl JsonText {
    /// Checks `text` for JSON syntax and keeps it (without surrounding
    /// whitespace).
    ///
    /// ```
    /// use factline_core::JsonText;
    /// let data = JsonText::parse(r#" {"total_cents": 1299} "#).unwrap();
    /// assert_eq!(data.as_str(), r#"{"total_cents": 1299}"#);
    /// assert_eq!(data.to_value().unwrap()["total_cents"], 1299);
    /// assert!(JsonText::parse("{").is_err());
    /// ```
    pub fn parse(text: impl Into<String>) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text.into()).map(|raw| JsonText {
            raw,
            serialised: false,
        })
    }

    /// Serialises `value` straight to text, with no [`Value`] in between.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        // A value may carry raw JSON text of its own (a `JsonText` or
        // `RawValue` field), so this text gets the full look on append.
        serde_json::value::to_raw_value(value).map(|raw| JsonText {
            raw,
            serialised: false,
        })
    }

    /// The empty object, `{}`.
    pub fn empty_object() -> Self {
        JsonText {
            raw: RawValue::from_string("{}".to_owned()).expect("{} is JSON"),
            serialised: true,
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        self.raw.get()
    }

    /// The text parsed into a [`Value`].
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(self.as_str())
    }

    /// [`check_readable`] for text whose syntax is known good: most text
    /// passes a quick look, and only the rest is parsed.
    pub fn check_readable(&self) -> Result<(), serde_json::Error> {
        let text = self.as_str().as_bytes();
        // Nesting 128 deep takes 256 bytes of brackets.
        let shallow = text.len() < 2 * MAX_DEPTH;
        let plain = if self.serialised {
            shallow || quick_look(text, false)
        } else {
            quick_look(text, true)
        };
        if plain {
            return Ok(());
        }
        check_readable(self.as_str())
    }

    /// The text decoded into any deserialisable type.
    pub fn decode<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.as_str())
    }
}

impl From<Value> for JsonText {
    fn from(value: Value) -> Self {
        JsonText::from(&value)
    }
}

impl From<&Value> for JsonText {
    fn from(value: &Value) -> Self {
        // A Value has string keys and finite numbers only, so it serialises,
        // and its text can be unreadable only by its nesting.
        let raw = serde_json::value::to_raw_value(value).expect("a Value always serialises");
        JsonText {
            raw,
            serialised: true,
        }
    }
}

/// Equal when the texts are equal (`{"a":1}` and `{ "a": 1 }` are not).
impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// Equal when the text parses into `other`.
impl PartialEq<Value> for JsonText {
    fn eq(&self, other: &Value) -> bool {
        self.to_value().is_ok_and(|value| &value == other)
    }
}

impl std::fmt::Display for JsonText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks that `text` parses into a [`Value`] under the rules every reader
/// applies: nesting under 128 levels, numbers in `f64` range, strings
/// without lone surrogate escapes. The store refuses anything else on
/// append, so whatever it accepts every reader can return.
///
/// It walks the text once without building anything, using the same
/// parser as [`JsonText::to_value`], so the two cannot disagree.
///
/// ```
/// use factline_core::backend::check_readable;
/// assert!(check_readable(r#"{"a":[1,2.5,"\u00e9"]}"#).is_ok());
/// assert!(check_readable("1e400").is_err());
/// assert!(check_readable(r#""\ud800""#).is_err());
/// assert!(check_readable(&format!("{}{}", "[".repeat(128), "]".repeat(128))).is_err());
/// ```
pub fn check_readable(text: &str) -> Result<(), serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    de::DeserializeSeed::deserialize(Walk, &mut deserializer)?;
    deserializer.end()
}

/// Nesting the parser refuses, as `serde_json` counts it.
const MAX_DEPTH: usize = 128;

/// A quick look at JSON text of good syntax for what only a full parse can
/// judge: true when nothing in it can be unreadable. It always looks at the
/// nesting; with `values` also at surrogate escapes and at numbers with an
/// exponent or hundreds of digits. Anything else goes to the full parse,
/// so this only has to be right when it says true; appends mostly carry
/// text like that, and this costs a fraction of the parse.
fn quick_look(text: &[u8], values: bool) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut i = 0;
    while i < text.len() {
        let byte = text[i];
        if in_string {
            // Most bytes of event data are plain string bytes: one compare
            // each, and the rare quote or backslash below.
            if byte == b'"' {
                in_string = false;
            } else if byte == b'\\' {
                // `\uD800`–`\uDFFF` are halves of a pair: the parser judges
                // those.
                if values
                    && text.get(i + 1) == Some(&b'u')
                    && matches!(text.get(i + 2), Some(b'd' | b'D'))
                    && matches!(
                        text.get(i + 3),
                        Some(b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')
                    )
                {
                    return false;
                }
                i += 2;
                continue;
            }
            i += 1;
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth >= MAX_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            // Outside strings, `e` is in an exponent or in `true`/`false`.
            b'e' | b'E'
                if values && i > 0 && (text[i - 1].is_ascii_digit() || text[i - 1] == b'.') =>
            {
                return false;
            }
            b'0'..=b'9' if values => {
                let start = i;
                while i < text.len() && text[i].is_ascii_digit() {
                    i += 1;
                }
                // 300 digits stay well under f64::MAX (about 1.8e308).
                if i - start > 300 {
                    return false;
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    !in_string
}

/// Visits every value through `deserialize_any`, as a [`Value`] parse
/// does, and keeps nothing.
#[derive(Clone, Copy)]
struct Walk;

impl<'de> de::DeserializeSeed<'de> for Walk {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Walk)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Key)?.is_some() {
            map.next_value_seed(Walk)?;
        }
        Ok(())
    }
}

/// An object key: a string, checked like any other string.
struct Key;

impl<'de> de::DeserializeSeed<'de> for Key {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(Walk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// JSON text with the pieces a quick look could misjudge.
    fn tricky_json() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            prop::sample::select(vec![
                "1e400",
                "-1e-400",
                "1.5E3",
                "0",
                "-0.0",
                "123456789012345678901234567890"
            ])
            .prop_map(str::to_owned),
            (1usize..400).prop_map(|n| "9".repeat(n)),
            prop::sample::select(vec![
                r#""\ud800""#,
                r#""\udc00\ud800""#,
                r#""\ud83d\ude00""#,
                r#""\u0041\\u""#,
                r#""a\"b""#,
                r#""\\""#
            ])
            .prop_map(str::to_owned),
        ];
        let tree = leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec(inner, 0..4).prop_map(|v| {
                    let fields: Vec<String> = v
                        .iter()
                        .enumerate()
                        .map(|(i, v)| format!("\"k{i}\":{v}"))
                        .collect();
                    format!("{{{}}}", fields.join(","))
                }),
            ]
        });
        (tree, 0usize..140)
            .prop_map(|(tree, depth)| format!("{}{tree}{}", "[".repeat(depth), "]".repeat(depth)))
    }

    proptest! {
        /// Whatever path it takes, the check agrees with a strict parse.
        #[test]
        fn the_check_agrees_with_a_strict_parse(text in tricky_json()) {
            let strict = serde_json::from_str::<Value>(&text).is_ok();
            prop_assert_eq!(check_readable(&text).is_ok(), strict);
            let json = JsonText::parse(text.as_str()).unwrap();
            prop_assert_eq!(json.check_readable().is_ok(), strict);
        }
    }

    #[test]
    fn json_text_keeps_its_text_as_given() {
        let line = r#"{"type":"X","data": {"b":1, "a":[1.50, "\u0000"]} }"#;
        let e: crate::EventData = serde_json::from_str(line).unwrap();
        assert_eq!(e.data.as_str(), r#"{"b":1, "a":[1.50, "\u0000"]}"#);
        assert_eq!(
            e.data.to_value().unwrap(),
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

    /// The syntax check lets through what a strict parse refuses; the
    /// text is still kept, and its value is an error rather than a panic.
    #[test]
    fn text_that_does_not_decode_is_kept_and_reports_an_error() {
        for text in ["1e400", r#"{"s":"\udc00"}"#] {
            let kept = JsonText::parse(text).unwrap();
            assert_eq!(kept.as_str(), text);
            assert!(kept.to_value().is_err(), "{text}");
            assert!(check_readable(text).is_err(), "{text}");
        }
    }

    #[test]
    fn readable_means_a_value_parse_succeeds() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let nested_objects = |n: usize| format!("{}1{}", r#"{"a":"#.repeat(n), "}".repeat(n));
        let cases = [
            "0".to_owned(),
            "-0.0e-400".to_owned(),
            "1.7976931348623157e308".to_owned(),
            "1.8e308".to_owned(),
            "-1e400".to_owned(),
            "18446744073709551616".to_owned(),
            r#""\ud83d\ude00""#.to_owned(),
            r#""\ud83d""#.to_owned(),
            r#""\ude00\ud83d""#.to_owned(),
            r#"{"\ud800":1}"#.to_owned(),
            r#""\u0000\n\t\"\\\/""#.to_owned(),
            deep(127),
            deep(128),
            nested_objects(127),
            nested_objects(128),
            "[1,2] 3".to_owned(),
            " {} ".to_owned(),
        ];
        for text in &cases {
            let strict = serde_json::from_str::<Value>(text).is_ok();
            assert_eq!(check_readable(text).is_ok(), strict, "{text:.40}");
            if let Ok(json) = JsonText::parse(text.as_str()) {
                assert_eq!(json.check_readable().is_ok(), strict, "{text:.40}");
            }
        }
        let long = |digits: usize| "9".repeat(digits);
        assert!(quick_look(br#"{"a":[1,-2.5,"x\"y\u00e9"],"b":{}}"#, true));
        assert!(!quick_look(b"[1e5]", true) && quick_look(b"[1e5]", false));
        for (text, readable) in [
            (long(308), true),
            (long(309), false),
            (format!("[{}]", long(400)), false),
        ] {
            assert_eq!(
                JsonText::parse(text.as_str())
                    .unwrap()
                    .check_readable()
                    .is_ok(),
                readable
            );
        }
        assert!(check_readable(&deep(127)).is_ok());
        assert!(check_readable(&deep(128)).is_err());
    }
}
