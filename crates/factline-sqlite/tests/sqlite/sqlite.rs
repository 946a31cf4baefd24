//! Behaviour specific to the SQLite backend.

use factline_core::{EventData, EventStore, ExpectedVersion, ReadStream, StoreError, StreamId};
use factline_sqlite::{SqliteConfig, SqliteStore, SCHEMA_VERSION};
use serde_json::json;

fn sid(s: &str) -> StreamId {
    StreamId::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_single_appends_share_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("e.db")).unwrap();
    let mut tasks = Vec::new();
    for w in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                // Every fifth append of a writer is bound to conflict.
                let expected = if i % 5 == 4 {
                    ExpectedVersion::Exact(1_000)
                } else {
                    ExpectedVersion::Any
                };
                let result = store
                    .append(
                        &sid(&format!("Gc-{w}")),
                        expected,
                        vec![EventData::new("T", json!({ "i": i }))],
                    )
                    .await;
                match (i % 5 == 4, result) {
                    (false, Ok(_)) | (true, Err(StoreError::Conflict { .. })) => {}
                    (_, other) => panic!("writer {w} append {i}: {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.appends, 64 * 20);
    assert!(
        stats.transactions < stats.appends,
        "appends were not grouped: {stats:?}"
    );
    assert_eq!(store.read_all(1, usize::MAX).await.unwrap().len(), 64 * 16);
}

#[tokio::test]
async fn data_survives_reopen_and_positions_continue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.db");
    let first = {
        let store = SqliteStore::open(&path).unwrap();
        store
            .append(
                &sid("Order-1"),
                ExpectedVersion::NoStream,
                vec![EventData::new("A", json!(1)), EventData::new("B", json!(2))],
            )
            .await
            .unwrap()
    };
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.head_position().await.unwrap(), first.last_position);
    let read = store
        .read_stream(&sid("Order-1"), ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(
        read.iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        vec!["A", "B"]
    );
    let next = store
        .append(
            &sid("Order-1"),
            ExpectedVersion::Exact(2),
            vec![EventData::new("C", json!(3))],
        )
        .await
        .unwrap();
    assert_eq!(next.first_position, first.last_position + 1);
    assert_eq!(next.first_version, 3);
}

#[tokio::test]
async fn opens_in_wal_mode_with_durable_commits_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.db");
    let store = SqliteStore::open(&path).unwrap();
    store
        .append(
            &sid("Order-1"),
            ExpectedVersion::Any,
            vec![EventData::new("A", json!(1))],
        )
        .await
        .unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(
        SqliteConfig::new(&path).synchronous,
        factline_sqlite::Synchronous::Full
    );
}

#[tokio::test]
async fn refuses_a_database_from_a_newer_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    match SqliteStore::open(&path) {
        Err(StoreError::Storage(e)) => assert!(e.message().contains("newer"), "{e}"),
        other => panic!("expected a schema error, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn configured_event_size_limit_applies() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SqliteConfig::new(dir.path().join("e.db"));
    config.limits.max_event_bytes = 1_000;
    let store = SqliteStore::open_with(config).unwrap();
    let big = EventData::new("Big", json!({ "x": "y".repeat(1_000) }));
    let result = store
        .append(&sid("Order-1"), ExpectedVersion::Any, vec![big])
        .await;
    assert!(
        matches!(result, Err(StoreError::TooLarge { max: 1_000, .. })),
        "{result:?}"
    );
    assert_eq!(store.head_position().await.unwrap(), 0);
}

#[tokio::test]
async fn a_second_store_on_the_same_file_sees_and_wakes_on_commits() {
    // Two handles on one file behave like two processes: their writers
    // serialise on SQLite's lock, and subscriptions see the other's commits.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.db");
    let a = SqliteStore::open(&path).unwrap();
    let b = SqliteStore::open(&path).unwrap();
    let mut sub = a.subscribe(factline_core::StreamFilter::All, 1);
    let mut tasks = Vec::new();
    for (n, store) in [a.clone(), b.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for i in 0..200 {
                store
                    .append(
                        &sid(&format!("S{n}-{}", i % 7)),
                        ExpectedVersion::Any,
                        vec![EventData::new("T", json!(i))],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut positions = Vec::new();
    while positions.len() < 400 {
        let e = tokio::time::timeout(std::time::Duration::from_secs(30), sub.next())
            .await
            .expect("subscription stalled")
            .unwrap();
        positions.push(e.position);
    }
    assert_eq!(positions, (1..=400).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_subscriptions_are_woken_by_the_append_not_the_fallback_poll() {
    // With the cross-process poll pushed out of reach, only the writer's
    // wake-up can deliver live events.
    let dir = tempfile::tempdir().unwrap();
    let mut config = SqliteConfig::new(dir.path().join("e.db"));
    config.fallback_poll = std::time::Duration::from_secs(3_600);
    let store = SqliteStore::open_with(config).unwrap();
    let mut sub = store.subscribe(factline_core::StreamFilter::All, 1);
    let follower = tokio::spawn(async move {
        let mut positions = Vec::new();
        while positions.len() < 20 {
            positions.push(sub.next().await.unwrap().position);
        }
        positions
    });
    let mut appended = Vec::new();
    for i in 0..20u64 {
        // Give the follower time to run dry and wait before each append.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let r = store
            .append(
                &sid("Order-1"),
                ExpectedVersion::Any,
                vec![EventData::new("T", json!(i))],
            )
            .await
            .unwrap();
        appended.push(r.first_position);
    }
    let delivered = tokio::time::timeout(std::time::Duration::from_secs(30), follower)
        .await
        .expect("live events were not delivered: appends did not wake the subscription")
        .unwrap();
    assert_eq!(delivered, appended);
}

/// Idle subscriptions cost no queries: one poll of the head per store
/// serves them all, and a commit by another process still reaches every
/// one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_subscriptions_share_one_head_poll() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.db");
    let mut config = SqliteConfig::new(&path);
    config.fallback_poll = std::time::Duration::from_millis(50);
    let watched = SqliteStore::open_with(config).unwrap();
    let other_process = SqliteStore::open(&path).unwrap();
    let waiting: Vec<_> = (0..300)
        .map(|_| {
            let mut sub = watched.subscribe(factline_core::StreamFilter::All, 1);
            tokio::spawn(async move { sub.next().await.map(|e| e.position) })
        })
        .collect();
    // Every subscription has made its first read and found nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while watched.reads() < 300 {
        assert!(
            std::time::Instant::now() < deadline,
            "subscriptions never read"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let before = watched.reads();
    // Ten poll intervals of idleness.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(watched.reads(), before, "idle subscriptions ran queries");
    other_process
        .append(
            &sid("Order-1"),
            ExpectedVersion::Any,
            vec![EventData::new("T", json!(1))],
        )
        .await
        .unwrap();
    for task in waiting {
        let position = tokio::time::timeout(std::time::Duration::from_secs(30), task)
            .await
            .expect("a commit of another process did not wake a subscription")
            .unwrap()
            .unwrap();
        assert_eq!(position, 1);
    }
}
