//! One public async function per behaviour. Each takes a fresh, empty store.

use std::collections::HashSet;
use std::time::Duration;

use factline_core::{
    AppendResult, Appended, CommandKey, CommandRecord, Direction, EventData, EventStore,
    ExpectedVersion, IdempotencyMismatch, JsonText, Limits, Metadata, ReadStream, RecordedEvent,
    StoreError, StreamFilter, StreamId,
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

/// Bounded reads stop at the event that crosses the byte budget, keep
/// their limit, filter and direction, and always return one event when
/// any matches; the pages join up to the whole.
pub async fn bounded_reads_stop_at_the_byte_budget<S: EventStore>(store: S) {
    for i in 0..40u64 {
        let stream = if i % 2 == 0 { "Big-1" } else { "Small-1" };
        let size = if i % 2 == 0 { 1000 + i as usize } else { 10 };
        let e = EventData::new("Sized", json!({ "i": i, "pad": "x".repeat(size) }));
        store.append(&sid(stream), ANY, vec![e]).await.unwrap();
    }
    let all = all_events(&store).await;
    let expected = |events: &[RecordedEvent], limit: usize, budget: usize| {
        let mut bytes = 0;
        let mut n = 0;
        for e in events.iter().take(limit) {
            n += 1;
            bytes += e.text_len();
            if bytes >= budget {
                break;
            }
        }
        n
    };
    for (limit, budget) in [
        (100, 1),
        (100, 2500),
        (100, 10_000),
        (5, 1_000_000),
        (100, usize::MAX),
    ] {
        let page = store
            .read_filtered_bounded(&StreamFilter::All, 1, limit, budget)
            .await
            .unwrap();
        assert_eq!(
            page.len(),
            expected(&all, limit, budget),
            "limit {limit}, budget {budget}"
        );
        assert_eq!(page, all[..page.len()].to_vec());
    }
    // Paging on from the last position reads everything exactly once.
    let mut paged = Vec::new();
    loop {
        let from = paged.last().map_or(1, |e: &RecordedEvent| e.position + 1);
        let page = store
            .read_filtered_bounded(&StreamFilter::All, from, 1000, 3000)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        paged.extend(page);
    }
    assert_eq!(paged, all);
    let big: Vec<_> = all
        .iter()
        .filter(|e| e.stream_id.as_str() == "Big-1")
        .cloned()
        .collect();
    let page = store
        .read_filtered_bounded(&StreamFilter::Category("Big".into()), 1, 100, 3500)
        .await
        .unwrap();
    assert_eq!(page, big[..expected(&big, 100, 3500)].to_vec());
    let backwards = store
        .read_stream_bounded(
            &sid("Big-1"),
            ReadStream {
                direction: Direction::Backwards,
                from_version: None,
                limit: 100,
            },
            2500,
        )
        .await
        .unwrap();
    let reversed: Vec<_> = big.iter().rev().cloned().collect();
    assert_eq!(
        backwards,
        reversed[..expected(&reversed, 100, 2500)].to_vec()
    );
    let forwards = store
        .read_stream_bounded(&sid("Big-1"), ReadStream::forwards(), 1)
        .await
        .unwrap();
    assert_eq!(forwards, big[..1].to_vec());
}

/// Stream ids are validated when constructed, so a store can never be handed
/// an invalid one; this checks the rules every backend relies on.
pub async fn invalid_stream_ids_cannot_be_constructed<S: EventStore>(store: S) {
    for bad in ["", "$all", "-x", "line\nbreak"] {
        assert!(StreamId::new(bad).is_err(), "{bad:?}");
    }
    assert!(StreamId::new("x".repeat(257)).is_err());
    assert!(serde_json::from_value::<StreamId>(json!("")).is_err());
    assert!(all_events(&store).await.is_empty());
}

pub async fn read_stream_forwards_backwards_from_and_limit<S: EventStore>(store: S) {
    let s = sid("Order-1");
    store.append(&s, ANY, events(0..5)).await.unwrap();
    store
        .append(&sid("Order-2"), ANY, events(0..2))
        .await
        .unwrap();
    store.append(&s, ANY, events(5..10)).await.unwrap();
    let versions = |evs: Vec<RecordedEvent>| evs.iter().map(|e| e.version).collect::<Vec<_>>();
    let read = |o| store.read_stream(&s, o);
    assert_eq!(
        versions(read(ReadStream::forwards()).await.unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        versions(
            read(ReadStream::forwards().from_version(4).limit(3))
                .await
                .unwrap()
        ),
        vec![4, 5, 6]
    );
    assert_eq!(
        versions(read(ReadStream::forwards().from_version(9)).await.unwrap()),
        vec![9, 10]
    );
    assert!(read(ReadStream::forwards().from_version(11))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        versions(read(ReadStream::backwards().limit(3)).await.unwrap()),
        vec![10, 9, 8]
    );
    assert_eq!(
        versions(read(ReadStream::backwards().from_version(2)).await.unwrap()),
        vec![2, 1]
    );
    assert_eq!(
        versions(
            read(ReadStream::backwards().from_version(50).limit(1))
                .await
                .unwrap()
        ),
        vec![10]
    );
    assert!(read(ReadStream::forwards().limit(0))
        .await
        .unwrap()
        .is_empty());
    let data: Vec<_> = read(ReadStream::forwards())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.data.to_value().unwrap()["n"].as_u64().unwrap())
        .collect();
    assert_eq!(data, (0..10).collect::<Vec<_>>());
}

pub async fn read_missing_stream_is_empty<S: EventStore>(store: S) {
    store
        .append(&sid("Order-1"), ANY, events(0..1))
        .await
        .unwrap();
    let read = store
        .read_stream(&sid("Order-404"), ReadStream::forwards())
        .await
        .unwrap();
    assert!(read.is_empty());
    let read = store
        .read_stream(&sid("Order-404"), ReadStream::backwards())
        .await
        .unwrap();
    assert!(read.is_empty());
}

pub async fn read_all_positions_strictly_increase_with_from_and_limit<S: EventStore>(store: S) {
    for i in 0..20 {
        store
            .append(&sid(&format!("Order-{}", i % 3)), ANY, events(0..3))
            .await
            .unwrap();
    }
    let all = all_events(&store).await;
    assert_eq!(all.len(), 60);
    assert_eq!(all[0].position, 1);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    let page = store.read_all(all[10].position, 5).await.unwrap();
    assert_eq!(page, all[10..15].to_vec());
    assert!(store
        .read_all(all[59].position + 1, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.read_all(0, 1).await.unwrap(), all[..1].to_vec());
    assert_eq!(store.head_position().await.unwrap(), all[59].position);
}

pub async fn read_category_returns_only_that_category<S: EventStore>(store: S) {
    for i in 0..10 {
        store
            .append(&sid(&format!("Order-{i}")), ANY, events(0..2))
            .await
            .unwrap();
        store
            .append(&sid(&format!("Customer-{i}")), ANY, events(0..1))
            .await
            .unwrap();
        store
            .append(&sid("Orderly"), ANY, events(0..1))
            .await
            .unwrap();
    }
    let orders = store.read_category("Order", 1, usize::MAX).await.unwrap();
    assert_eq!(orders.len(), 20);
    assert!(orders.iter().all(|e| e.stream_id.category() == "Order"));
    assert!(orders.windows(2).all(|w| w[0].position < w[1].position));
    let page = store
        .read_category("Order", orders[5].position, 4)
        .await
        .unwrap();
    assert_eq!(page, orders[5..9].to_vec());
    assert_eq!(
        store.read_category("Orderly", 1, 100).await.unwrap().len(),
        10
    );
    assert!(store
        .read_category("Nothing", 1, 100)
        .await
        .unwrap()
        .is_empty());
}

pub async fn metadata_and_data_round_trip<S: EventStore>(store: S) {
    let mut metadata = Metadata {
        correlation_id: Some("corr-1".into()),
        causation_id: Some(Uuid::new_v4().to_string()),
        schema_version: 3,
        ..Metadata::default()
    };
    metadata.headers.insert("user".into(), "zoë".into());
    metadata
        .headers
        .insert("trace".into(), "a=b; c=\"d\"".into());
    let data = json!({ "unicode": "日本語 ✓", "nested": { "list": [1, 2.5, null, true] }, "big": u64::MAX });
    let sent = EventData::new("Shaped", data.clone()).with_metadata(metadata.clone());
    let before = std::time::SystemTime::now();
    store
        .append(
            &sid("Order-1"),
            ANY,
            vec![sent.clone(), EventData::new("Bare", json!(42))],
        )
        .await
        .unwrap();
    let read = store
        .read_stream(&sid("Order-1"), ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(read[0].event_id, sent.event_id);
    assert_eq!(read[0].event_type, "Shaped");
    assert_eq!(read[0].data, data);
    assert_eq!(read[0].metadata, metadata);
    assert_eq!(read[1].data, json!(42));
    assert_eq!(read[1].metadata, Metadata::default());
    let recorded: std::time::SystemTime = read[0].recorded_at.into();
    let skew = Duration::from_secs(5);
    assert!(recorded + skew >= before && recorded <= std::time::SystemTime::now() + skew);
}

/// Collects `count` events from a subscription, failing after a generous
/// deadline instead of hanging the suite.
async fn collect(sub: &mut factline_core::Subscription, count: usize) -> Vec<RecordedEvent> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        match tokio::time::timeout(Duration::from_secs(60), sub.next()).await {
            Ok(Ok(e)) => got.push(e),
            Ok(Err(e)) => panic!("subscription failed after {} events: {e}", got.len()),
            Err(_) => panic!("subscription stalled after {} of {count} events", got.len()),
        }
    }
    got
}

pub async fn subscription_catches_up_then_goes_live_under_concurrent_writes<
    S: EventStore + Clone,
>(
    store: S,
) {
    const WRITERS: u64 = 8;
    const TOTAL: u64 = 10_000;
    const HISTORY: u64 = 400;
    const PER_WRITER: u64 = (TOTAL - HISTORY) / WRITERS;
    const _: () = assert!(HISTORY + PER_WRITER * WRITERS == TOTAL);
    // Some history first, so the subscription starts in catch-up mode.
    store
        .append(&sid("Order-history"), ANY, events(0..HISTORY))
        .await
        .unwrap();
    let mut sub = store.subscribe(StreamFilter::All, 1);
    let head_before = collect(&mut sub, 100).await;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while i < PER_WRITER {
                let n = (i % 7 + 1).min(PER_WRITER - i);
                store
                    .append(
                        &sid(&format!("Order-w{w}-{}", i % 13)),
                        ANY,
                        events(i..i + n),
                    )
                    .await
                    .unwrap();
                i += n;
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let mut got = head_before;
    got.extend(collect(&mut sub, TOTAL as usize - 100 - 4).await);
    for w in writers {
        w.await.unwrap();
    }
    got.extend(collect(&mut sub, 4).await);
    let stored = all_events(&store).await;
    assert_eq!(stored.len(), TOTAL as usize);
    assert_eq!(got.len(), stored.len());
    let ids = |v: &[RecordedEvent]| {
        v.iter()
            .map(|e| (e.position, e.event_id))
            .collect::<Vec<_>>()
    };
    assert!(
        ids(&got) == ids(&stored),
        "subscription order differs from $all"
    );
    // Nothing more is delivered once caught up.
    let extra = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(extra.is_err(), "unexpected extra event {extra:?}");
}

pub async fn subscription_to_category_and_stream_filters_and_resumes<S: EventStore + Clone>(
    store: S,
) {
    let target = sid("Order-7");
    for i in 0..30 {
        store
            .append(&sid(&format!("Order-{}", i % 10)), ANY, events(0..1))
            .await
            .unwrap();
        store
            .append(&sid(&format!("Customer-{i}")), ANY, events(0..1))
            .await
            .unwrap();
    }
    let mut cat = store.subscribe(StreamFilter::Category("Order".into()), 1);
    let mut one = store.subscribe(StreamFilter::Stream(target.clone()), 1);
    let orders = collect(&mut cat, 30).await;
    assert!(orders.iter().all(|e| e.stream_id.category() == "Order"));
    let mine = collect(&mut one, 3).await;
    assert!(mine.iter().all(|e| e.stream_id == target));
    assert_eq!(
        mine.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // Live: a write to the target stream reaches both, a customer write neither.
    let writer = store.clone();
    let t = target.clone();
    let live = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer
            .append(&sid("Customer-live"), ANY, events(0..1))
            .await
            .unwrap();
        writer.append(&t, ANY, events(0..1)).await.unwrap()
    });
    let next_cat = collect(&mut cat, 1).await.remove(0);
    let next_one = collect(&mut one, 1).await.remove(0);
    let appended = live.await.unwrap();
    assert_eq!(next_cat.position, appended.first_position);
    assert_eq!(next_one.position, appended.first_position);
    assert_eq!(next_one.version, 4);
    // Resuming after a delivered position continues exactly there.
    let mut resumed = store.subscribe(
        StreamFilter::Category("Order".into()),
        orders[9].position + 1,
    );
    let rest = collect(&mut resumed, 21).await;
    let expect: Vec<u64> = orders[10..]
        .iter()
        .map(|e| e.position)
        .chain([appended.first_position])
        .collect();
    assert_eq!(rest.iter().map(|e| e.position).collect::<Vec<_>>(), expect);
    let unique: HashSet<_> = rest.iter().map(|e| e.event_id).collect();
    assert_eq!(unique.len(), rest.len());
}

/// Any valid JSON is stored as sent, including escapes some databases'
/// JSON types refuse (`\u0000`) and deep nesting.
pub async fn any_valid_json_round_trips<S: EventStore>(store: S) {
    let mut deep = json!("bottom");
    for _ in 0..64 {
        deep = json!([deep]);
    }
    let data =
        json!({ "nul": "a\u{0}b", "escapes": "\"\\/\n\t\u{1f}", "deep": deep, "neg": -1.5e300 });
    let sent = EventData::new("Odd", data.clone());
    store
        .append(&sid("Odd-1"), ANY, vec![sent.clone()])
        .await
        .unwrap();
    let read = store
        .read_stream(&sid("Odd-1"), ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(read[0].data, data);
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

fn key(key: &str, fingerprint: &str) -> CommandKey {
    CommandKey::new(key, fingerprint)
}

/// Limits that keep command keys for a moment; `auto_purge` makes the
/// store purge on every keyed append instead of never.
pub fn short_command_retention(auto_purge: bool) -> Limits {
    Limits {
        command_retention: Duration::from_millis(400),
        command_purge_interval: if auto_purge {
            Duration::ZERO
        } else {
            Duration::from_secs(24 * 3600)
        },
        ..Limits::default()
    }
}

fn written(appended: Appended) -> AppendResult {
    match appended {
        Appended::Written(result) => result,
        Appended::Replayed(record) => panic!("expected a write, the key replayed {record:?}"),
    }
}

fn replayed(appended: Appended) -> CommandRecord {
    match appended {
        Appended::Replayed(record) => record,
        Appended::Written(result) => panic!("expected a replay, the append wrote {result:?}"),
    }
}

pub async fn command_key_is_stored_with_its_events_and_repeats_replay<S: EventStore>(store: S) {
    let s = sid("Order-1");
    let first = events(0..2);
    let ids: Vec<Uuid> = first.iter().map(|e| e.event_id).collect();
    let pay = key("order-1/pay", "fp-1");
    let result = written(
        store
            .append_command(&s, ExpectedVersion::NoStream, first, &pay)
            .await
            .unwrap(),
    );
    assert_eq!((result.first_version, result.last_version), (1, 2));
    let record = store
        .find_command("order-1/pay")
        .await
        .unwrap()
        .expect("the key is stored with the events");
    assert_eq!(record.key, "order-1/pay");
    assert_eq!(record.fingerprint, "fp-1");
    assert_eq!(record.result, result);
    assert_eq!(record.event_ids, ids);
    assert!(store.find_command("order-1/ship").await.unwrap().is_none());

    // The repeat brings new event ids and an expectation that would now
    // conflict: it is still the same command, so it replays.
    let again = replayed(
        store
            .append_command(&s, ExpectedVersion::NoStream, events(5..7), &pay)
            .await
            .unwrap(),
    );
    assert_eq!(again, record);
    assert_eq!(store.head_position().await.unwrap(), 2);
    let stored = store.read_stream(&s, ReadStream::forwards()).await.unwrap();
    assert_eq!(stored.iter().map(|e| e.event_id).collect::<Vec<_>>(), ids);
}

pub async fn command_key_of_another_command_is_refused<S: EventStore>(store: S) {
    let s = sid("Order-1");
    store
        .append_command(&s, ANY, events(0..1), &key("k", "pay 10"))
        .await
        .unwrap();
    for stream in ["Order-1", "Order-2"] {
        let err = store
            .append_command(&sid(stream), ANY, events(1..2), &key("k", "pay 20"))
            .await
            .unwrap_err();
        match err {
            StoreError::CommandKeyReused { key, stream_id } => {
                assert_eq!(key, "k");
                assert_eq!(stream_id, s);
            }
            other => panic!("expected CommandKeyReused, got {other:?}"),
        }
    }
    assert_eq!(all_events(&store).await.len(), 1);
    assert!(matches!(
        store
            .append_command(&s, ANY, events(1..2), &key("", "x"))
            .await,
        Err(StoreError::InvalidInput(_))
    ));
}

pub async fn rejected_command_stores_no_key<S: EventStore>(store: S) {
    let s = sid("Order-1");
    store.append(&s, ANY, events(0..1)).await.unwrap();
    let ship = key("ship", "f");
    let conflict = store
        .append_command(&s, ExpectedVersion::NoStream, events(1..2), &ship)
        .await;
    expect_conflict(conflict, 1);
    assert!(store.find_command("ship").await.unwrap().is_none());
    let too_big = EventData::new("Big", json!("x".repeat(70_000)));
    assert!(matches!(
        store.append_command(&s, ANY, vec![too_big], &ship).await,
        Err(StoreError::TooLarge { .. })
    ));
    assert!(store.find_command("ship").await.unwrap().is_none());
    let result = written(
        store
            .append_command(&s, ExpectedVersion::Exact(1), events(1..2), &ship)
            .await
            .unwrap(),
    );
    assert_eq!(result.first_version, 2);
}

/// Sixteen senders of one command at once: one executes, the others get
/// its record, whether they raced on the version or not.
pub async fn concurrent_commands_with_one_key_execute_once<S: EventStore + Clone>(store: S) {
    for (round, expected) in [ANY, ExpectedVersion::NoStream].into_iter().enumerate() {
        let s = sid(&format!("Order-{round}"));
        let command = key(&format!("place-{round}"), "same payload");
        let mut tasks = Vec::new();
        for i in 0..16 {
            let (store, s, command) = (store.clone(), s.clone(), command.clone());
            tasks.push(tokio::spawn(async move {
                store
                    .append_command(&s, expected, events(i..i + 2), &command)
                    .await
            }));
        }
        let mut writes = Vec::new();
        let mut replays = Vec::new();
        for task in tasks {
            match task.await.unwrap().unwrap() {
                Appended::Written(result) => writes.push(result),
                Appended::Replayed(record) => replays.push(record),
            }
        }
        assert_eq!(writes.len(), 1, "exactly one of 16 senders executes");
        let record = store.find_command(&command.key).await.unwrap().unwrap();
        assert_eq!(record.result, writes[0]);
        assert!(replays.iter().all(|r| *r == record));
        let stored = store.read_stream(&s, ReadStream::forwards()).await.unwrap();
        assert_eq!(
            stored.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            record.event_ids
        );
    }
}

pub async fn expired_command_keys_are_free_and_purged_on_demand<S: EventStore>(store: S) {
    let s = sid("Order-1");
    store
        .append_command(&s, ANY, events(0..1), &key("old", "a"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        store.find_command("old").await.unwrap().is_none(),
        "a key past its retention counts as absent"
    );
    // The store purges only every day here, so the row is still there.
    assert_eq!(store.purge_commands().await.unwrap(), 1);
    assert_eq!(store.purge_commands().await.unwrap(), 0);
    store
        .append_command(&s, ANY, events(1..2), &key("stale", "a"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // An expired key is free for another command, purged or not.
    let again = written(
        store
            .append_command(&s, ANY, events(2..3), &key("stale", "b"))
            .await
            .unwrap(),
    );
    let record = store.find_command("stale").await.unwrap().unwrap();
    assert_eq!((record.fingerprint.as_str(), record.result), ("b", again));
}

pub async fn expired_command_keys_are_purged_by_the_store<S: EventStore>(store: S) {
    let s = sid("Order-1");
    store
        .append_command(&s, ANY, events(0..1), &key("old", "a"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The next command's append purges what expired meanwhile.
    store
        .append_command(&s, ANY, events(1..2), &key("new", "a"))
        .await
        .unwrap();
    assert_eq!(
        store.purge_commands().await.unwrap(),
        0,
        "the expired key was already purged"
    );
    assert!(store.find_command("new").await.unwrap().is_some());
}

pub async fn snapshots_keep_the_newest_per_stream_and_format<S: EventStore>(store: S) {
    let (a, b) = (sid("Order-a"), sid("Order-b"));
    assert!(store.load_snapshot(&a).await.unwrap().is_none());
    let state = |n: u64| JsonText::from(json!({ "total": n, "note": "é\u{0}" }));
    store.save_snapshot(&a, 10, 1, &state(10)).await.unwrap();
    let kept = store.load_snapshot(&a).await.unwrap().unwrap();
    assert_eq!(kept.stream_id, a);
    assert_eq!((kept.version, kept.snapshot_version), (10, 1));
    assert_eq!(kept.data, state(10).to_value().unwrap());

    // An older snapshot of the same format does not replace a newer one.
    store.save_snapshot(&a, 5, 1, &state(5)).await.unwrap();
    assert_eq!(store.load_snapshot(&a).await.unwrap().unwrap().version, 10);
    // Another format replaces it whatever its version.
    store.save_snapshot(&a, 5, 2, &state(5)).await.unwrap();
    let kept = store.load_snapshot(&a).await.unwrap().unwrap();
    assert_eq!((kept.version, kept.snapshot_version), (5, 2));
    store.save_snapshot(&a, 20, 2, &state(20)).await.unwrap();
    let kept = store.load_snapshot(&a).await.unwrap().unwrap();
    assert_eq!(
        (kept.version, kept.data),
        (20, state(20).to_value().unwrap())
    );
    assert!(store.load_snapshot(&b).await.unwrap().is_none());
}
