use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use crate::StreamId;

/// What an append expects of the stream's current version.
///
/// Versions are 1-based, so a stream that does not exist has version 0 and
/// `Exact(0)` means the same as `NoStream`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ExpectedVersion {
    /// No expectation: append whatever the stream holds.
    #[default]
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must hold at least one event.
    StreamExists,
    /// The stream must hold exactly this many events.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream currently at `current` (0 = no stream) satisfies this.
    pub fn is_satisfied_by(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::StreamExists => current > 0,
            ExpectedVersion::Exact(n) => current == n,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no_stream"),
            ExpectedVersion::StreamExists => f.write_str("stream_exists"),
            ExpectedVersion::Exact(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid expected version {0:?}: use any, no_stream, stream_exists or a number")]
/// An expected version that does not parse; the text says what was given.
pub struct ParseExpectedVersionError(pub String);

impl FromStr for ExpectedVersion {
    type Err = ParseExpectedVersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "any" => Ok(ExpectedVersion::Any),
            "no_stream" => Ok(ExpectedVersion::NoStream),
            "stream_exists" => Ok(ExpectedVersion::StreamExists),
            n => n
                .parse::<u64>()
                .map(ExpectedVersion::Exact)
                .map_err(|_| ParseExpectedVersionError(s.to_string())),
        }
    }
}

/// Exact versions serialise as numbers, the others as their names, so JSON
/// error bodies read `"expected": 3` or `"expected": "no_stream"`.
impl Serialize for ExpectedVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ExpectedVersion::Exact(n) => serializer.serialize_u64(*n),
            other => serializer.collect_str(other),
        }
    }
}

/// Where an append landed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AppendResult {
    /// The stream appended to.
    pub stream_id: StreamId,
    /// The version of the first event written.
    pub first_version: u64,
    /// The version of the last event written.
    pub last_version: u64,
    /// The global position of the first event written.
    pub first_position: u64,
    /// The global position of the last event written.
    pub last_position: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn satisfaction_table() {
        use ExpectedVersion::*;
        assert!(Any.is_satisfied_by(0) && Any.is_satisfied_by(7));
        assert!(NoStream.is_satisfied_by(0) && !NoStream.is_satisfied_by(1));
        assert!(!StreamExists.is_satisfied_by(0) && StreamExists.is_satisfied_by(1));
        assert!(Exact(0).is_satisfied_by(0) && !Exact(0).is_satisfied_by(1));
        assert!(Exact(3).is_satisfied_by(3) && !Exact(3).is_satisfied_by(4));
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in ["", "-1", "latest", "1.5"] {
            assert!(bad.parse::<ExpectedVersion>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serialises_numbers_as_numbers() {
        assert_eq!(
            serde_json::to_string(&ExpectedVersion::Exact(3)).unwrap(),
            "3"
        );
        assert_eq!(
            serde_json::to_string(&ExpectedVersion::NoStream).unwrap(),
            "\"no_stream\""
        );
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(n in any::<u64>(), kind in 0u8..4) {
            let v = match kind {
                0 => ExpectedVersion::Any,
                1 => ExpectedVersion::NoStream,
                2 => ExpectedVersion::StreamExists,
                _ => ExpectedVersion::Exact(n),
            };
            prop_assert_eq!(v.to_string().parse::<ExpectedVersion>().unwrap(), v);
        }
    }
}
