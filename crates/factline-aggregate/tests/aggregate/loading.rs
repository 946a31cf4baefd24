//! Loading aggregates: snapshots, upcasting stored old shapes, and time
//! travel.

use factline_aggregate::{AsOf, CommandContext, CommandHandler, DecodeError, Failure, UpcastError};
use factline_core::{
    EventData, EventStore, ExpectedVersion, JsonText, Metadata, ReadStream, StreamFilter, StreamId,
    TypedError,
};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

use crate::account::*;

factline_conformance::on_every_backend!(
    snapshots_shortcut_loads_and_bad_ones_are_replaced,
    stored_v1_events_are_upcast_on_every_typed_read,
    loads_as_of_version_position_and_time,
);

/// Loads start from the latest snapshot; a snapshot of another snapshot
/// version, or one that does not decode, is ignored and replaced.
async fn snapshots_shortcut_loads_and_bad_ones_are_replaced(store: Arc<dyn EventStore>) {
    let plain = CommandHandler::<Account>::new(store.clone());
    let snapshotting = CommandHandler::<Account>::new(store.clone()).with_snapshots(10);
    let ctx = CommandContext::new();
    snapshotting.handle("s1", &open("sam"), &ctx).await.unwrap();
    for amount in 1..=24 {
        let deposit = AccountCommand::Deposit { amount };
        snapshotting.handle("s1", &deposit, &ctx).await.unwrap();
    }
    let stream = CommandHandler::<Account>::stream_id("s1").unwrap();
    let kept = store.load_snapshot(&stream).await.unwrap().unwrap();
    assert_eq!((kept.version, kept.snapshot_version), (20, 1));
    let full = plain.load("s1").await.unwrap();
    assert_eq!((full.state.balance, full.version), (300, 25));
    assert_eq!((full.snapshot, full.events_applied), (None, 25));
    let quick = snapshotting.load("s1").await.unwrap();
    assert_eq!((quick.snapshot, quick.events_applied), (Some(20), 5));
    assert_eq!((quick.state, quick.version), (full.state, 25));

    let unusable = [
        (99, json!({"open": true, "balance": 1})),
        (1, json!({"open": "yes", "balance": "lots"})),
    ];
    for (snapshot_version, data) in unusable {
        store
            .save_snapshot(&stream, 25, snapshot_version, &JsonText::from(data))
            .await
            .unwrap();
        let loaded = snapshotting.load("s1").await.unwrap();
        assert_eq!((loaded.snapshot, loaded.events_applied), (None, 25));
        assert_eq!(loaded.state.balance, 300);
        let replaced = store.load_snapshot(&stream).await.unwrap().unwrap();
        assert_eq!((replaced.version, replaced.snapshot_version), (25, 1));
        assert_eq!(replaced.data, json!({"open": true, "balance": 300}));
        let next = snapshotting.load("s1").await.unwrap();
        assert_eq!((next.snapshot, next.events_applied), (Some(25), 0));
    }
}

/// `Deposited` stored in its v1 shape reads as the current event on the
/// handler's load and on a typed subscription; the stored event stays as it
/// was. A version with no path is a clear error.
async fn stored_v1_events_are_upcast_on_every_typed_read(store: Arc<dyn EventStore>) {
    let accounts = CommandHandler::<Account>::new(store.clone());
    accounts
        .handle("u1", &open("uma"), &CommandContext::new())
        .await
        .unwrap();
    let stream = CommandHandler::<Account>::stream_id("u1").unwrap();
    let v1 = |sum: i64| {
        EventData::new("Deposited", json!({ "sum": sum })).with_metadata(Metadata {
            schema_version: 1,
            ..Metadata::default()
        })
    };
    store
        .append(&stream, ExpectedVersion::Exact(1), vec![v1(7), v1(8)])
        .await
        .unwrap();
    accounts
        .handle(
            "u1",
            &AccountCommand::Deposit { amount: 5 },
            &CommandContext::new(),
        )
        .await
        .unwrap();
    assert_eq!(accounts.load("u1").await.unwrap().state.balance, 20);

    let stored = store
        .read_stream(&stream, ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(
        stored[1].data,
        json!({"sum": 7}),
        "stored events are never rewritten"
    );
    assert_eq!(stored[1].metadata.schema_version, 1);
    assert_eq!(stored[3].data, json!({"amount": 5}));
    assert_eq!(
        stored[3].metadata.schema_version, 2,
        "new events carry the current version"
    );

    let mut subscription = store.subscribe(StreamFilter::Stream(stream.clone()), 1);
    let mut typed = Vec::new();
    for _ in 0..4 {
        typed.push(subscription.next_typed::<AccountEvent>().await.unwrap().1);
    }
    assert_eq!(
        typed[1..],
        [
            AccountEvent::Deposited { amount: 7 },
            AccountEvent::Deposited { amount: 8 },
            AccountEvent::Deposited { amount: 5 },
        ]
    );

    let future = EventData::new("Deposited", json!({"amount": 1})).with_metadata(Metadata {
        schema_version: 3,
        ..Metadata::default()
    });
    store
        .append(&stream, ExpectedVersion::Any, vec![future])
        .await
        .unwrap();
    match accounts.load("u1").await {
        Err(Failure::Decode {
            version: 5,
            source: DecodeError::Upcast(e),
            ..
        }) => {
            assert!(
                matches!(
                    &e,
                    UpcastError::FromTheFuture { event_type, stored: 3, current: 2 }
                        if event_type == "Deposited"
                ),
                "{e:?}"
            );
            assert!(e.to_string().contains("Deposited v3"), "{e}");
        }
        other => panic!("expected a decode failure, got {other:?}"),
    }
    match subscription.next_typed::<AccountEvent>().await {
        Err(TypedError::Decode { position, .. }) => assert_eq!(position, stored[3].position + 1),
        other => panic!("expected a decode error, got {other:?}"),
    }
}

/// An aggregate as of a version, a global position or a time, also when a
/// later snapshot exists.
async fn loads_as_of_version_position_and_time(store: Arc<dyn EventStore>) {
    let accounts = CommandHandler::<Account>::new(store.clone()).with_snapshots(2);
    let other = StreamId::new("Noise-1").unwrap();
    let ctx = CommandContext::new();
    accounts.handle("t1", &open("tia"), &ctx).await.unwrap();
    for amount in [1, 2, 4] {
        // Other streams' events between, so positions and versions differ.
        store
            .append(
                &other,
                ExpectedVersion::Any,
                vec![EventData::new("Noise", json!({}))],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let deposit = AccountCommand::Deposit { amount };
        accounts.handle("t1", &deposit, &ctx).await.unwrap();
    }
    let stream = CommandHandler::<Account>::stream_id("t1").unwrap();
    let events = store
        .read_stream(&stream, ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(
        store.load_snapshot(&stream).await.unwrap().unwrap().version,
        4
    );

    let at = |as_of| accounts.load_as_of("t1", as_of);
    let v2 = at(AsOf::Version(2)).await.unwrap();
    assert_eq!((v2.state.balance, v2.version, v2.snapshot), (1, 2, None));
    let v4 = at(AsOf::Version(4)).await.unwrap();
    assert_eq!((v4.state.balance, v4.snapshot), (7, Some(4)));
    let p = at(AsOf::Position(events[2].position)).await.unwrap();
    assert_eq!((p.state.balance, p.version), (3, 3));
    let between = at(AsOf::Position(events[2].position + 1)).await.unwrap();
    assert_eq!(between.version, 3, "the next position is another stream's");
    let t = at(AsOf::Time(events[1].recorded_at)).await.unwrap();
    assert_eq!((t.state.balance, t.version), (1, 2));
    let before = at(AsOf::Time(
        events[0].recorded_at - chrono::Duration::seconds(1),
    ))
    .await
    .unwrap();
    assert_eq!((before.version, before.state), (0, Account::default()));
    assert_eq!(at(AsOf::Version(99)).await.unwrap().version, 4);
}
