//! One public async function per behaviour. Each takes a fresh, empty store.
//! Appends, idempotency and guardrails are here; reads and subscriptions
//! in `reads`, command keys and snapshots in `commands`.

mod commands;
mod reads;

pub use commands::*;
pub use reads::*;

use std::collections::HashSet;
use std::time::Duration;

use factline_core::{
    AppendResult, Appended, CommandKey, CommandRecord, Direction, EventData, EventStore,
    ExpectedVersion, IdempotencyMismatch, JsonText, Limits, Metadata, ReadStream, RecordedEvent,
    StoreError, StreamFilter, StreamId, Tally, TallyRow,
};
use serde_json::json;
use uuid::Uuid;

const ANY: ExpectedVersion = ExpectedVersion::Any;

fn sid(s: &str) -> StreamId {
    StreamId::new(s).expect("test stream ids are valid")
}

fn event(n: u64) -> EventData {
    EventData::new("Tested", json!({ "n": n }))
}

fn events(range: std::ops::Range<u64>) -> Vec<EventData> {
    range.map(event).collect()
}

async fn all_events<S: EventStore>(store: &S) -> Vec<RecordedEvent> {
    store.read_all(1, usize::MAX).await.expect("read $all")
}

fn expect_conflict(result: Result<impl std::fmt::Debug, StoreError>, want_actual: u64) {
    match result {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, want_actual),
        other => panic!("expected a conflict with actual {want_actual}, got {other:?}"),
    }
}

pub async fn no_stream_creates_stream_with_versions_from_one<S: EventStore>(store: S) {
    let s = sid("Order-1");
    let r = store
        .append(&s, ExpectedVersion::NoStream, events(0..3))
        .await
        .unwrap();
    assert_eq!((r.first_version, r.last_version), (1, 3));
    assert_eq!((r.first_position, r.last_position), (1, 3));
    assert_eq!(r.stream_id, s);
    let read = store.read_stream(&s, ReadStream::forwards()).await.unwrap();
    let versions: Vec<u64> = read.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![1, 2, 3]);
    assert_eq!(store.head_position().await.unwrap(), 3);
}

pub async fn no_stream_on_existing_stream_conflicts<S: EventStore>(store: S) {
    let s = sid("Order-1");
    store
        .append(&s, ExpectedVersion::NoStream, events(0..2))
        .await
        .unwrap();
    let err = store
        .append(&s, ExpectedVersion::NoStream, events(2..3))
        .await;
    match err {
        Err(StoreError::Conflict {
            stream_id,
            expected,
            actual,
        }) => {
            assert_eq!(stream_id, s);
            assert_eq!(expected, ExpectedVersion::NoStream);
            assert_eq!(actual, 2);
        }
        other => panic!("expected conflict, got {other:?}"),
    }
    assert_eq!(all_events(&store).await.len(), 2);
}

pub async fn exact_version_matches_or_conflicts_with_actual<S: EventStore>(store: S) {
    let s = sid("Order-1");
    expect_conflict(
        store
            .append(&s, ExpectedVersion::Exact(1), events(0..1))
            .await,
        0,
    );
    store
        .append(&s, ExpectedVersion::Exact(0), events(0..2))
        .await
        .unwrap();
    let r = store
        .append(&s, ExpectedVersion::Exact(2), events(2..4))
        .await
        .unwrap();
    assert_eq!((r.first_version, r.last_version), (3, 4));
    expect_conflict(
        store
            .append(&s, ExpectedVersion::Exact(2), events(4..5))
            .await,
        4,
    );
    expect_conflict(
        store
            .append(&s, ExpectedVersion::Exact(5), events(4..5))
            .await,
        4,
    );
    assert_eq!(all_events(&store).await.len(), 4);
}

pub async fn exact_zero_means_no_stream<S: EventStore>(store: S) {
    let s = sid("Order-1");
    let r = store
        .append(&s, ExpectedVersion::Exact(0), events(0..1))
        .await
        .unwrap();
    assert_eq!(r.first_version, 1);
    expect_conflict(
        store
            .append(&s, ExpectedVersion::Exact(0), events(1..2))
            .await,
        1,
    );
}

pub async fn stream_exists_requires_events<S: EventStore>(store: S) {
    let s = sid("Order-1");
    expect_conflict(
        store
            .append(&s, ExpectedVersion::StreamExists, events(0..1))
            .await,
        0,
    );
    assert!(all_events(&store).await.is_empty());
    store.append(&s, ANY, events(0..1)).await.unwrap();
    let r = store
        .append(&s, ExpectedVersion::StreamExists, events(1..2))
        .await
        .unwrap();
    assert_eq!(r.first_version, 2);
}

pub async fn any_always_appends<S: EventStore>(store: S) {
    let s = sid("Order-1");
    for i in 0..3 {
        let r = store.append(&s, ANY, events(i..i + 1)).await.unwrap();
        assert_eq!(r.first_version, i + 1);
    }
}

pub async fn concurrent_appends_at_same_version_exactly_one_wins<S: EventStore + Clone>(store: S) {
    let s = sid("Order-race");
    store.append(&s, ANY, events(0..1)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let store = store.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            store
                .append(&s, ExpectedVersion::Exact(1), events(i..i + 2))
                .await
        }));
    }
    let mut wins = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => {
                wins += 1;
                assert_eq!((r.first_version, r.last_version), (2, 3));
            }
            Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, 3),
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(wins, 1, "exactly one of 32 racing appends must win");
    let read = store.read_stream(&s, ReadStream::forwards()).await.unwrap();
    assert_eq!(read.len(), 3);
}

/// Backends may commit concurrent appends together; a rejected append must
/// not take the others down with it.
pub async fn conflict_in_one_append_does_not_fail_concurrent_others<S: EventStore + Clone>(
    store: S,
) {
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            // Odd tasks expect a version their fresh stream cannot have.
            let expected = if i % 2 == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(5)
            };
            store
                .append(&sid(&format!("Mixed-{i}")), expected, events(0..1))
                .await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let result = task.await.unwrap();
        if i % 2 == 0 {
            assert!(result.is_ok(), "append {i} failed: {result:?}");
        } else {
            expect_conflict(result, 0);
        }
    }
    assert_eq!(all_events(&store).await.len(), 32);
}

pub async fn idempotent_retry_returns_original_and_writes_nothing<S: EventStore>(store: S) {
    let s = sid("Order-1");
    let batch = events(0..3);
    let original = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    // The same events again, with the same and with a looser expectation.
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Exact(0), ANY] {
        let retry = store.append(&s, expected, batch.clone()).await.unwrap();
        assert_eq!(retry, original, "retry with {expected}");
    }
    // Retrying an append in the middle of a stream works the same way.
    let second = events(3..5);
    let r2 = store
        .append(&s, ExpectedVersion::Exact(3), second.clone())
        .await
        .unwrap();
    store.append(&s, ANY, events(5..6)).await.unwrap();
    let retry = store
        .append(&s, ExpectedVersion::Exact(3), second.clone())
        .await
        .unwrap();
    assert_eq!(retry, r2);
    let retry = store
        .append(&s, ExpectedVersion::StreamExists, second)
        .await
        .unwrap();
    assert_eq!(retry, r2);
    assert_eq!(all_events(&store).await.len(), 6);
}

/// A retry repeats its events: the same id with another type, data or
/// metadata is a mismatch, not a success that drops the new payload. Data
/// and metadata compare as JSON, so spacing and key order do not count.
pub async fn idempotent_retry_with_changed_content_is_a_mismatch<S: EventStore + Clone>(store: S) {
    let s = sid("Order-1");
    let original = EventData::new("Placed", JsonText::parse(r#"{"a":1,"b":[2]}"#).unwrap())
        .with_metadata(Metadata {
            correlation_id: Some("c-1".into()),
            ..Metadata::default()
        });
    let stored = store.append(&s, ANY, vec![original.clone()]).await.unwrap();
    let changed = |f: &dyn Fn(&mut EventData)| {
        let mut e = original.clone();
        f(&mut e);
        e
    };
    let variants = [
        changed(&|e| e.event_type = "Paid".into()),
        changed(&|e| e.data = json!({"a": 2, "b": [2]}).into()),
        changed(&|e| e.metadata.correlation_id = None),
        changed(&|e| e.metadata.schema_version = 2),
        changed(&|e| {
            e.metadata.headers.insert("h".into(), "v".into());
        }),
    ];
    for variant in variants {
        let result = store.append(&s, ANY, vec![variant.clone()]).await;
        assert!(
            matches!(
                &result,
                Err(StoreError::IdempotencyMismatch {
                    reason: IdempotencyMismatch::DifferentContent { event_id },
                    ..
                }) if *event_id == original.event_id
            ),
            "{variant:?}: {result:?}"
        );
    }
    let respaced = changed(&|e| e.data = JsonText::parse(r#"{ "b": [2], "a": 1 }"#).unwrap());
    assert_eq!(store.append(&s, ANY, vec![respaced]).await.unwrap(), stored);
    // Sent at once, one payload wins and the others are refused.
    let id = uuid::Uuid::now_v7();
    let tasks: Vec<_> = (0..6)
        .map(|n| {
            let store = store.clone();
            let e = EventData::new("Racing", json!({ "n": n % 2 })).with_event_id(id);
            tokio::spawn(async move { store.append(&sid("Order-2"), ANY, vec![e]).await })
        })
        .collect();
    let mut won = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(result) => won.push(result),
            Err(StoreError::IdempotencyMismatch { .. }) => {}
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(!won.is_empty() && won.windows(2).all(|w| w[0] == w[1]));
    let events = all_events(&store).await;
    assert_eq!(events.len(), 2, "one event per id");
}

pub async fn idempotent_retry_with_incompatible_expectation_conflicts<S: EventStore>(store: S) {
    let s = sid("Order-1");
    let batch = events(0..2);
    store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    expect_conflict(
        store
            .append(&s, ExpectedVersion::Exact(2), batch.clone())
            .await,
        2,
    );
    expect_conflict(
        store.append(&s, ExpectedVersion::StreamExists, batch).await,
        2,
    );
    assert_eq!(all_events(&store).await.len(), 2);
}

pub async fn partial_overlap_is_refused_and_writes_nothing<S: EventStore>(store: S) {
    let s = sid("Order-1");
    let batch = events(0..3);
    store.append(&s, ANY, batch.clone()).await.unwrap();
    let overlapping = vec![batch[2].clone(), event(9)];
    match store.append(&s, ANY, overlapping).await {
        Err(StoreError::IdempotencyMismatch {
            reason:
                IdempotencyMismatch::PartialOverlap {
                    stored: 1,
                    total: 2,
                },
            ..
        }) => {}
        other => panic!("expected a partial-overlap error, got {other:?}"),
    }
    let reordered = vec![batch[1].clone(), batch[0].clone()];
    match store.append(&s, ANY, reordered).await {
        Err(StoreError::IdempotencyMismatch {
            reason: IdempotencyMismatch::DifferentOrder,
            ..
        }) => {}
        other => panic!("expected a different-order error, got {other:?}"),
    }
    assert_eq!(all_events(&store).await.len(), 3);
}

pub async fn event_id_used_in_other_stream_is_refused<S: EventStore>(store: S) {
    let e = event(1);
    store
        .append(&sid("Order-1"), ANY, vec![e.clone()])
        .await
        .unwrap();
    match store.append(&sid("Order-2"), ANY, vec![e.clone()]).await {
        Err(StoreError::IdempotencyMismatch {
            reason:
                IdempotencyMismatch::OtherStream {
                    event_id,
                    stream_id,
                },
            ..
        }) => {
            assert_eq!(event_id, e.event_id);
            assert_eq!(stream_id, sid("Order-1"));
        }
        other => panic!("expected an other-stream error, got {other:?}"),
    }
    assert!(store
        .read_stream(&sid("Order-2"), ReadStream::forwards())
        .await
        .unwrap()
        .is_empty());
}

pub async fn duplicate_event_id_in_one_append_is_refused<S: EventStore>(store: S) {
    let e = event(1);
    let result = store.append(&sid("Order-1"), ANY, vec![e.clone(), e]).await;
    assert!(
        matches!(result, Err(StoreError::InvalidInput(_))),
        "{result:?}"
    );
    assert!(all_events(&store).await.is_empty());
}

pub async fn empty_append_is_refused<S: EventStore>(store: S) {
    let result = store.append(&sid("Order-1"), ANY, vec![]).await;
    assert!(
        matches!(result, Err(StoreError::InvalidInput(_))),
        "{result:?}"
    );
}

pub async fn oversized_event_is_refused_and_nothing_written<S: EventStore>(store: S) {
    let big = EventData::new("Big", json!({ "blob": "x".repeat(64 * 1024) }));
    let big_id = big.event_id;
    // One oversized event spoils the whole append.
    let result = store
        .append(&sid("Order-1"), ANY, vec![event(1), big])
        .await;
    match result {
        Err(StoreError::TooLarge {
            event_id,
            size,
            max,
        }) => {
            assert_eq!(event_id, big_id);
            assert!(size > max);
            assert_eq!(max, 64 * 1024);
        }
        other => panic!("expected too-large, got {other:?}"),
    }
    assert!(all_events(&store).await.is_empty());
    // Just under the limit is fine.
    let fits = EventData::new("Fits", json!({ "blob": "x".repeat(60 * 1024) }));
    store
        .append(&sid("Order-1"), ANY, vec![fits])
        .await
        .unwrap();
}

pub async fn malformed_event_type_is_refused_and_nothing_written<S: EventStore>(store: S) {
    for bad in ["", "a\nb", &"t".repeat(300)] {
        let e = EventData::new(bad, json!({}));
        let result = store.append(&sid("Order-1"), ANY, vec![event(1), e]).await;
        assert!(
            matches!(result, Err(StoreError::InvalidInput(_))),
            "{bad:?}: {result:?}"
        );
    }
    assert!(all_events(&store).await.is_empty());
}

/// Data that is JSON but that no reader could parse back (a number past
/// the float range, nesting of 128 levels, a lone surrogate) is refused
/// with the whole append, so every stored event stays readable; the
/// readable extremes beside them are stored as sent.
pub async fn unreadable_json_is_refused_and_nothing_written<S: EventStore>(store: S) {
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    for bad in [
        "1e400".to_owned(),
        r#"{"a":[-1.8e308]}"#.to_owned(),
        r#"{"s":"\ud800"}"#.to_owned(),
        r#"{"\udc00":1}"#.to_owned(),
        deep(128),
    ] {
        let e = EventData::new("Odd", JsonText::parse(bad.as_str()).unwrap());
        let result = store.append(&sid("Odd-1"), ANY, vec![event(1), e]).await;
        assert!(
            matches!(&result, Err(StoreError::InvalidInput(m)) if m.contains("cannot be read back")),
            "{bad:.40}: {result:?}"
        );
    }
    assert!(all_events(&store).await.is_empty());
    let edges = [
        "1e-400",
        "1.7976931348623157e308",
        r#""\ud83d\ude00\u0000""#,
        &deep(127),
    ];
    for text in edges {
        let e = EventData::new("Odd", JsonText::parse(text).unwrap());
        store.append(&sid("Odd-1"), ANY, vec![e]).await.unwrap();
    }
    let read = all_events(&store).await;
    let texts: Vec<&str> = read.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(texts, edges, "stored as sent");
    assert!(read.iter().all(|e| e.data.to_value().is_ok()));
}

/// The same append sent several times at once (a client retrying before
/// the first answer came back) is written once, and every copy gets the
/// original result.
pub async fn simultaneous_identical_appends_write_once<S: EventStore + Clone>(store: S) {
    let batch = events(0..3);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, batch) = (store.clone(), batch.clone());
        tasks.push(tokio::spawn(async move {
            store.append(&sid("Order-1"), ANY, batch).await
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap().expect("every copy succeeds"));
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:?}");
    let stored = all_events(&store).await;
    assert_eq!(stored.len(), 3);
    assert_eq!(results[0].last_position, stored[2].position);
}

/// A large append (stores may split it into several statements) whose
/// 900th event reuses an id stored elsewhere is refused whole.
pub async fn large_append_refused_late_writes_nothing<S: EventStore>(store: S) {
    let taken = EventData::new("Taken", json!({}));
    store
        .append(&sid("Customer-1"), ANY, vec![taken.clone()])
        .await
        .unwrap();
    let mut batch = events(0..1000);
    batch[900].event_id = taken.event_id;
    match store.append(&sid("Order-1"), ANY, batch.clone()).await {
        Err(StoreError::IdempotencyMismatch {
            reason: IdempotencyMismatch::OtherStream { event_id, .. },
            ..
        }) => assert_eq!(event_id, taken.event_id),
        other => panic!("expected an id used in another stream, got {other:?}"),
    }
    assert_eq!(all_events(&store).await.len(), 1);
    // Without the clash the same append goes through whole, in order.
    batch[900].event_id = Uuid::now_v7();
    let result = store
        .append(&sid("Order-1"), ANY, batch.clone())
        .await
        .unwrap();
    assert_eq!((result.first_version, result.last_version), (1, 1000));
    let stored = store
        .read_stream(&sid("Order-1"), ReadStream::forwards())
        .await
        .unwrap();
    assert!(stored
        .iter()
        .zip(&batch)
        .all(|(s, b)| s.event_id == b.event_id));
    assert!(stored
        .windows(2)
        .all(|w| w[1].position == w[0].position + 1));
}
