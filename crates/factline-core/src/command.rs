//! Command idempotency (C3) and snapshots (C4): what stores keep for the
//! command side besides events, and the rules every backend shares.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::{AppendResult, StoreError, StreamId};

/// A command's idempotency key and a fingerprint of the command itself.
/// The same key with another fingerprint is a different command reusing the
/// key, which is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandKey {
    /// The caller's idempotency key.
    pub key: String,
    /// A digest of the command, so a reused key with another command is told apart.
    pub fingerprint: String,
}

impl CommandKey {
    /// The longest key accepted, in bytes.
    pub const MAX_KEY_BYTES: usize = 256;
    /// The longest fingerprint accepted, in bytes.
    pub const MAX_FINGERPRINT_BYTES: usize = 256;

    /// A key and the fingerprint of the command it belongs to.
    pub fn new(key: impl Into<String>, fingerprint: impl Into<String>) -> Self {
        CommandKey {
            key: key.into(),
            fingerprint: fingerprint.into(),
        }
    }

    /// Refuses keys a store could not keep as given.
    pub fn validate(&self) -> Result<(), StoreError> {
        let problem = if self.key.is_empty() {
            "is empty"
        } else if self.key.len() > Self::MAX_KEY_BYTES {
            "is longer than 256 bytes"
        } else if self.key.chars().any(char::is_control) {
            "contains a control character"
        } else if self.fingerprint.len() > Self::MAX_FINGERPRINT_BYTES {
            "has a fingerprint longer than 256 bytes"
        } else {
            return Ok(());
        };
        Err(StoreError::invalid_input(format!(
            "idempotency key {:?} {problem}",
            self.key.chars().take(64).collect::<String>()
        )))
    }
}

/// What a command with an idempotency key did, stored in the same
/// transaction as its events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CommandRecord {
    /// The idempotency key.
    pub key: String,
    /// The fingerprint of the command that used it.
    pub fingerprint: String,
    /// What the command's append did.
    pub result: AppendResult,
    /// The ids of the events it wrote, in order.
    pub event_ids: Vec<Uuid>,
    /// When it was stored.
    pub recorded_at: DateTime<Utc>,
}

impl CommandRecord {
    /// Whether the record is still kept: younger than `retention` at `now`.
    /// An expired record counts as absent even before it is purged, so the
    /// retention holds exactly however often purges run.
    pub fn is_live(&self, now: DateTime<Utc>, retention: Duration) -> bool {
        now.signed_duration_since(self.recorded_at)
            .to_std()
            .map_or(true, |age| age < retention)
    }
}

/// The oldest `recorded_at` a live record can have at `now`.
pub fn retention_cutoff(now: DateTime<Utc>, retention: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(retention)
        .ok()
        .and_then(|r| now.checked_sub_signed(r))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// How an append with an idempotency key went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// The events were written, and the key with them.
    Written(AppendResult),
    /// The key was already stored for the same command: nothing was
    /// written, and this is what the first execution stored.
    Replayed(CommandRecord),
}

impl Appended {
    /// What the command's append did.
    pub fn result(&self) -> &AppendResult {
        match self {
            Appended::Written(result) => result,
            Appended::Replayed(record) => &record.result,
        }
    }

    /// The newest position this append wrote, if it wrote anything.
    pub fn written_up_to(&self) -> Option<u64> {
        match self {
            Appended::Written(result) => Some(result.last_position),
            Appended::Replayed(_) => None,
        }
    }
}

/// Decides a keyed append against the record stored under its key (if any,
/// live or not): `Ok(Some(record))` means it is a repeat and nothing is
/// written; `Ok(None)` means it runs (replacing an expired record);
/// an error means the key belongs to another command.
pub fn resolve_command(
    key: &CommandKey,
    stored: Option<&CommandRecord>,
    now: DateTime<Utc>,
    retention: Duration,
) -> Result<Option<CommandRecord>, StoreError> {
    match stored {
        Some(record) if record.is_live(now, retention) => {
            if record.fingerprint == key.fingerprint {
                Ok(Some(record.clone()))
            } else {
                Err(StoreError::CommandKeyReused {
                    key: key.key.clone(),
                    stream_id: record.result.stream_id.clone(),
                })
            }
        }
        _ => Ok(None),
    }
}

/// The latest snapshot of a stream: an aggregate's state as of `version`.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The aggregate's stream.
    pub stream_id: StreamId,
    /// The stream version whose state this is.
    pub version: u64,
    /// The aggregate's snapshot format; a reader of another format ignores
    /// the snapshot.
    pub snapshot_version: u32,
    /// The aggregate's state, as its snapshot format writes it.
    pub data: Value,
    /// When it was saved.
    pub recorded_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fingerprint: &str, age: Duration, now: DateTime<Utc>) -> CommandRecord {
        CommandRecord {
            key: "k".into(),
            fingerprint: fingerprint.into(),
            result: AppendResult {
                stream_id: StreamId::new("Order-1").unwrap(),
                first_version: 1,
                last_version: 1,
                first_position: 1,
                last_position: 1,
            },
            event_ids: vec![Uuid::nil()],
            recorded_at: now - chrono::Duration::from_std(age).unwrap(),
        }
    }

    #[test]
    fn repeats_replay_other_commands_are_refused_and_expired_keys_are_free() {
        let now = Utc::now();
        let day = Duration::from_secs(86_400);
        let key = CommandKey::new("k", "f1");
        assert_eq!(resolve_command(&key, None, now, day).unwrap(), None);
        let fresh = record("f1", Duration::from_secs(60), now);
        assert_eq!(
            resolve_command(&key, Some(&fresh), now, day).unwrap(),
            Some(fresh.clone())
        );
        let other = record("f2", Duration::from_secs(60), now);
        assert!(matches!(
            resolve_command(&key, Some(&other), now, day),
            Err(StoreError::CommandKeyReused { .. })
        ));
        let expired = record("f2", day * 2, now);
        assert_eq!(
            resolve_command(&key, Some(&expired), now, day).unwrap(),
            None
        );
        assert!(retention_cutoff(now, day) < now);
        assert_eq!(
            retention_cutoff(now, Duration::MAX),
            DateTime::<Utc>::MIN_UTC
        );
    }

    #[test]
    fn keys_are_checked() {
        assert!(CommandKey::new("order-1/pay", "f").validate().is_ok());
        assert!(CommandKey::new("", "f").validate().is_err());
        assert!(CommandKey::new("a\nb", "f").validate().is_err());
        assert!(CommandKey::new("x".repeat(257), "f").validate().is_err());
    }
}
