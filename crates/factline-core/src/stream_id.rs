use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A validated stream id such as `Order-7f3a`.
///
/// The category is the part before the first `-` (the whole id when there is
/// none). Ids starting with `$` are reserved for system streams like `$all`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

/// Why a string is not a valid stream id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream id {shown:?}: {reason}")]
pub struct InvalidStreamId {
    /// The offending id, shortened so a huge input cannot flood a log line.
    pub shown: String,
    /// Why it is refused.
    pub reason: &'static str,
}

impl StreamId {
    /// The longest stream id accepted, in bytes.
    pub const MAX_BYTES: usize = 256;

    /// A stream id, if `id` is one: 1 to 256 bytes, no control characters, not
    /// starting with `$` or `-`.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidStreamId> {
        let id = id.into();
        let reject = |reason| {
            Err(InvalidStreamId {
                shown: id.chars().take(64).collect(),
                reason,
            })
        };
        if id.is_empty() {
            return reject("it is empty");
        }
        if id.len() > Self::MAX_BYTES {
            return reject("it is longer than 256 bytes");
        }
        if id.chars().any(char::is_control) {
            return reject("it contains a control character");
        }
        if id.starts_with('$') {
            return reject("ids starting with '$' are reserved for system streams");
        }
        if id.starts_with('-') {
            return reject("the category (the part before the first '-') is empty");
        }
        Ok(StreamId(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `-`, or the whole id when it has none.
    pub fn category(&self) -> &str {
        category_of(&self.0)
    }
}

/// The category of a stream id: the part before the first `-`.
pub fn category_of(id: &str) -> &str {
    id.split('-').next().unwrap_or(id)
}

/// Why a string is not a category.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{shown:?} is not a category: {reason}")]
pub struct InvalidCategory {
    /// The offending name, shortened for logs.
    pub shown: String,
    /// Why it is refused.
    pub reason: String,
}

/// Checks that `name` is a category: what a valid stream id has before
/// its first `-` (so it holds no `-` itself).
pub fn check_category(name: &str) -> Result<(), InvalidCategory> {
    let reject = |reason: String| {
        Err(InvalidCategory {
            shown: name.chars().take(64).collect(),
            reason,
        })
    };
    if name.contains('-') {
        return reject("a category is the part of a stream id before its first '-'".into());
    }
    match StreamId::new(name) {
        Ok(_) => Ok(()),
        Err(e) => reject(e.reason.into()),
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for StreamId {
    type Err = InvalidStreamId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StreamId::new(s)
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidStreamId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        StreamId::new(s)
    }
}

impl From<StreamId> for String {
    fn from(id: StreamId) -> String {
        id.0
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn categories_are_stream_ids_without_a_dash() {
        assert!(check_category("Order").is_ok());
        for (bad, says) in [
            ("Order-1", "before its first '-'"),
            ("", "empty"),
            ("$all", "reserved"),
            ("a\u{7}b", "control"),
        ] {
            let err = check_category(bad).unwrap_err().to_string();
            assert!(
                err.contains("is not a category") && err.contains(says),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn category_is_prefix_before_first_dash() {
        assert_eq!(StreamId::new("Order-7f3a-x").unwrap().category(), "Order");
        assert_eq!(StreamId::new("Order").unwrap().category(), "Order");
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in ["", "$all", "-x", "a\nb", "a\u{7f}b"] {
            assert!(StreamId::new(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(StreamId::new("a".repeat(257)).is_err());
        assert!(StreamId::new("a".repeat(256)).is_ok());
    }

    #[test]
    fn deserialising_validates() {
        assert!(serde_json::from_str::<StreamId>("\"\"").is_err());
        let id: StreamId = serde_json::from_str("\"Order-1\"").unwrap();
        assert_eq!(id.as_str(), "Order-1");
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip_and_category_is_a_prefix(s in "[A-Za-z0-9_][A-Za-z0-9_:.-]{0,200}") {
            let id = StreamId::new(s.clone()).unwrap();
            prop_assert_eq!(id.as_str(), s.as_str());
            prop_assert!(s.starts_with(id.category()));
            prop_assert!(!id.category().contains('-'));
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<StreamId>(&json).unwrap(), id);
        }

        #[test]
        fn any_control_character_is_refused(prefix in "[a-z]{1,10}", c in proptest::char::range('\u{0}', '\u{1f}')) {
            let id = format!("{prefix}{c}");
            prop_assert!(StreamId::new(id).is_err());
        }
    }
}
