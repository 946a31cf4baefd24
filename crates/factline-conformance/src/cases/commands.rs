//! Command keys (idempotent commands) and snapshots.

use super::*;

fn key(key: &str, fingerprint: &str) -> CommandKey {
    CommandKey::new(key, fingerprint)
}

/// Limits that keep command keys for a moment; `auto_purge` makes the
/// store purge on every keyed append instead of never.
pub fn short_command_retention(auto_purge: bool) -> Limits {
    let mut config = Limits::default();
    config.command_retention = Duration::from_millis(400);
    config.command_purge_interval = if auto_purge {
        Duration::ZERO
    } else {
        Duration::from_secs(24 * 3600)
    };
    config
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
