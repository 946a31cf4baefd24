//! PostgreSQL-specific behaviour: hole-free order under a held-open
//! transaction, group commit, migrations, cross-process wake-ups.

use crate::common;

use std::time::Duration;

use common::{connect, events, eventually, gated_store, sid};
use factline_core::{Appended, CommandKey, EventStore, ExpectedVersion, StoreError, StreamFilter};
use factline_postgres::{PostgresConfig, PostgresStore, SCHEMA_VERSION};

const ANY: ExpectedVersion = ExpectedVersion::Any;

/// Backends of this database waiting for a lock while running a statement
/// that takes the head row (the writer's first statement on either path).
async fn writers_waiting_for_head(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE '%.head%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// S4 with a transaction held open between taking its position and
/// committing. Store A and store B stand for two processes (each has its own
/// writer connection). A takes position 2 and is held before COMMIT; B's
/// transaction then cannot take any position until A ends, so no reader can
/// see B's event while A's lower position is still open. Once A commits,
/// the reader gets A's event and then B's, in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_open_transaction_keeps_later_commits_invisible_until_it_commits() {
    let db = factline_testkit::pg::database().await;
    let (a, gate) = gated_store(&db.url).await;
    let b = connect(&db.url).await;
    let reader = connect(&db.url).await;
    let admin = factline_testkit::pg::connect(&db.url).await;
    b.append(&sid("Order-0"), ANY, events(1, "before"))
        .await
        .unwrap();

    let held = tokio::spawn({
        let a = a.clone();
        async move { a.append(&sid("Order-a"), ANY, events(1, "a")).await }
    });
    // A has locked the head, taken position 2 and inserted its row.
    gate.reached().await;
    let later = tokio::spawn({
        let b = b.clone();
        async move { b.append(&sid("Order-b"), ANY, events(1, "b")).await }
    });
    eventually("B's transaction waits for A's head lock", || async {
        writers_waiting_for_head(&admin).await == 1
    })
    .await;
    assert_eq!(reader.read_all(2, 100).await.unwrap(), vec![]);
    assert_eq!(reader.head_position().await.unwrap(), 1);
    assert!(!later.is_finished(), "B committed while A was open");

    gate.release(true);
    let a_result = held.await.unwrap().unwrap();
    let b_result = later.await.unwrap().unwrap();
    assert_eq!((a_result.first_position, b_result.first_position), (2, 3));
    let read = reader.read_all(2, 100).await.unwrap();
    let seen: Vec<(u64, &str)> = read
        .iter()
        .map(|e| (e.position, e.stream_id.as_str()))
        .collect();
    assert_eq!(seen, vec![(2, "Order-a"), (3, "Order-b")]);
}

/// As above, but A rolls back: its position is never visible and B's event
/// takes it, so `$all` stays dense and in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_open_transaction_that_aborts_leaves_no_trace_and_no_gap() {
    let db = factline_testkit::pg::database().await;
    let (a, gate) = gated_store(&db.url).await;
    let b = connect(&db.url).await;
    let admin = factline_testkit::pg::connect(&db.url).await;

    let held = tokio::spawn({
        let a = a.clone();
        async move { a.append(&sid("Order-a"), ANY, events(2, "a")).await }
    });
    gate.reached().await;
    let later = tokio::spawn({
        let b = b.clone();
        async move { b.append(&sid("Order-b"), ANY, events(1, "b")).await }
    });
    eventually("B's transaction waits for A's head lock", || async {
        writers_waiting_for_head(&admin).await == 1
    })
    .await;
    assert_eq!(b.read_all(1, 100).await.unwrap(), vec![]);

    gate.release(false);
    match held.await.unwrap() {
        Err(StoreError::Storage(e)) => assert!(e.message().contains("cancelled"), "{e}"),
        other => panic!("A should have failed, got {other:?}"),
    }
    let b_result = later.await.unwrap().unwrap();
    assert_eq!(b_result.first_position, 1);
    let read = b.read_all(1, 100).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].stream_id.as_str(), "Order-b");
    assert!(a
        .read_stream(&sid("Order-a"), factline_core::ReadStream::forwards())
        .await
        .unwrap()
        .is_empty());
}

/// S11: appends queued while a transaction is in flight share the next one,
/// and each still succeeds or fails on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_single_appends_share_transactions() {
    let db = factline_testkit::pg::database().await;
    let (store, gate) = gated_store(&db.url).await;
    for i in 0..64 {
        // Every stream exists at version 1, so expected versions can fail.
        let setup = store.clone();
        let pending = tokio::spawn(async move {
            setup
                .append(&sid(&format!("Order-{i}")), ANY, events(1, "s"))
                .await
        });
        gate.reached().await;
        gate.release(true);
        pending.await.unwrap().unwrap();
    }
    let before = store.stats();

    // Hold one transaction at the gate until the other 63 appends queue.
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let store = store.clone();
        // Every fifth append expects the wrong version (not the first: a
        // transaction with nothing to write does not reach the gate).
        let expected = ExpectedVersion::Exact(if i % 5 == 4 { 7 } else { 1 });
        tasks.push(tokio::spawn(async move {
            store
                .append(&sid(&format!("Order-{i}")), expected, events(1, "g"))
                .await
        }));
        if i == 0 {
            gate.reached().await;
        }
    }
    eventually("the other appends queue", || async {
        store.queued_appends() == 63
    })
    .await;
    gate.release(true);
    gate.reached().await;
    gate.release(true);

    let mut ok = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(result) => {
                assert!(i % 5 != 4);
                assert_eq!(result.last_version, 2);
                ok += 1;
            }
            Err(StoreError::Conflict { actual, .. }) => {
                assert!(i % 5 == 4);
                assert_eq!(actual, 1);
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok, 52);
    let after = store.stats();
    assert_eq!(after.appends - before.appends, 64);
    assert_eq!(after.transactions - before.transactions, 2);
    assert_eq!(store.head_position().await.unwrap(), 64 + 52);
}

/// Senders of one command that queue behind a held transaction land in one
/// batch: the first writes, the rest are answered from the record planned
/// in that batch, which equals the record read back afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_command_key_repeated_within_a_batch_writes_once() {
    let db = factline_testkit::pg::database().await;
    let (store, gate) = gated_store(&db.url).await;
    let key = CommandKey::new("place-7", "same");
    let held = {
        let store = store.clone();
        tokio::spawn(async move { store.append(&sid("Other-1"), ANY, events(1, "h")).await })
    };
    gate.reached().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, key) = (store.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            store
                .append_command(
                    &sid("Order-7"),
                    ExpectedVersion::NoStream,
                    events(2, "k"),
                    &key,
                )
                .await
        }));
    }
    eventually("the commands queue", || async {
        store.queued_appends() == 8
    })
    .await;
    let before = store.stats();
    gate.release(true);
    held.await.unwrap().unwrap();
    gate.reached().await;
    gate.release(true);
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap().unwrap());
    }
    assert_eq!(
        store.stats().transactions - before.transactions,
        2,
        "one batch for all 8"
    );
    let record = store.find_command("place-7").await.unwrap().unwrap();
    let written: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            Appended::Written(result) => Some(result),
            Appended::Replayed(replayed) => {
                assert_eq!(replayed, &record, "a replay differs from the stored record");
                None
            }
        })
        .collect();
    assert_eq!(written, vec![&record.result]);
    assert_eq!(store.head_position().await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_starting_at_once_migrate_once() {
    let db = factline_testkit::pg::database().await;
    let mut starts = Vec::new();
    for _ in 0..8 {
        let url = db.url.clone();
        starts.push(tokio::spawn(
            async move { PostgresStore::connect(&url).await },
        ));
    }
    for start in starts {
        start.await.unwrap().expect("every store starts");
    }
    let admin = factline_testkit::pg::connect(&db.url).await;
    let versions: Vec<i32> = admin
        .query("SELECT version FROM factline.schema_version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
}

#[tokio::test]
async fn refuses_a_schema_from_a_newer_version() {
    let db = factline_testkit::pg::database().await;
    drop(connect(&db.url).await);
    let admin = factline_testkit::pg::connect(&db.url).await;
    admin
        .execute(
            "INSERT INTO factline.schema_version (version) VALUES ($1)",
            &[&(SCHEMA_VERSION + 1)],
        )
        .await
        .unwrap();
    match PostgresStore::connect(&db.url).await {
        Err(StoreError::Storage(e)) => assert!(e.message().contains("newer"), "{e}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

#[tokio::test]
async fn schemas_keep_stores_in_one_database_apart() {
    let db = factline_testkit::pg::database().await;
    let mut config = PostgresConfig::new(&db.url);
    config.schema = "tenant_a".into();
    let a = PostgresStore::connect_with(config.clone()).await.unwrap();
    config.schema = "tenant_b".into();
    let b = PostgresStore::connect_with(config).await.unwrap();
    a.append(&sid("Order-1"), ANY, events(3, "a"))
        .await
        .unwrap();
    b.append(&sid("Order-1"), ANY, events(1, "b"))
        .await
        .unwrap();
    assert_eq!(a.read_all(1, 100).await.unwrap().len(), 3);
    assert_eq!(b.read_all(1, 100).await.unwrap().len(), 1);

    let mut bad = PostgresConfig::new(&db.url);
    bad.schema = "Robert'); DROP TABLE x;--".into();
    assert!(matches!(
        PostgresStore::connect_with(bad).await,
        Err(StoreError::InvalidInput(_))
    ));
}

#[tokio::test]
async fn bad_connection_strings_and_unreachable_servers_fail_clearly() {
    assert!(matches!(
        PostgresStore::connect("postgres://h:notaport/db").await,
        Err(StoreError::InvalidInput(_))
    ));
    // Nothing listens on a port we just had bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    match PostgresStore::connect(&format!("postgres://postgres@127.0.0.1:{port}/x")).await {
        Err(StoreError::Storage(e)) => assert!(e.is_retryable(), "{e}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

/// Live subscriptions wake on commits made through another store (another
/// process), pushed by NOTIFY: the PostgreSQL store has no polling interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriptions_wake_on_commits_of_other_stores() {
    let db = factline_testkit::pg::database().await;
    let follower = connect(&db.url).await;
    let writer = connect(&db.url).await;
    let mut sub = follower.subscribe(StreamFilter::All, 1);
    for round in 0..20u64 {
        let appended = writer
            .append(&sid("Order-1"), ANY, events(1, "live"))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("woken by the other store's commit")
            .unwrap();
        assert_eq!(got.position, appended.first_position);
        assert_eq!(got.position, round + 1);
    }
}

/// Counts (or terminates) the listener connections of this database.
async fn listeners(admin: &tokio_postgres::Client, kill: bool) -> i64 {
    let sql = format!(
        "SELECT count({}) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name LIKE '% listener'",
        if kill {
            "pg_terminate_backend(pid)"
        } else {
            "*"
        }
    );
    admin.query_one(&sql, &[]).await.unwrap().get(0)
}

/// The listener's connection is killed while a subscriber waits: the
/// commit made while it is away is announced to nobody, yet it reaches the
/// subscriber once the listener has reconnected (which reads the head).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriber_survives_its_listener_connection_being_killed() {
    let db = factline_testkit::pg::database().await;
    let follower = connect(&db.url).await;
    let writer = connect(&db.url).await;
    let admin = factline_testkit::pg::connect(&db.url).await;
    let mut sub = follower.subscribe(StreamFilter::All, 1);
    for round in 1..=3u64 {
        eventually("both listeners are connected", || async {
            listeners(&admin, false).await == 2
        })
        .await;
        let waiting = tokio::spawn(async move {
            let next = tokio::time::timeout(Duration::from_secs(10), sub.next()).await;
            (sub, next)
        });
        // Let the subscriber find nothing and park on the head watch.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(listeners(&admin, true).await, 2);
        let appended = writer
            .append(&sid("Order-1"), ANY, events(1, "while away"))
            .await
            .unwrap();
        assert_eq!(appended.first_position, round);
        let (back, next) = waiting.await.unwrap();
        sub = back;
        let got = next.expect("woken after the listener reconnected").unwrap();
        assert_eq!(got.position, round);
    }
}

/// Each store guesses stream versions from its own last commits, and
/// another store (process) makes those guesses stale. A stale guess must
/// never commit: every append still gets exactly the versions and
/// conflicts the stored state says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_guesses_about_streams_never_commit() {
    let db = factline_testkit::pg::database().await;
    let a = connect(&db.url).await;
    let b = connect(&db.url).await;
    let order = sid("Order-1");
    let exact = ExpectedVersion::Exact;

    // A creates the stream and now guesses it is at version 1.
    let r = a
        .append(&order, ExpectedVersion::NoStream, events(1, "a1"))
        .await
        .unwrap();
    assert_eq!(r.last_version, 1);
    // B has never seen it: its guess "new stream" is wrong.
    match b
        .append(&order, ExpectedVersion::NoStream, events(1, "b"))
        .await
    {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, 1),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let r = b.append(&order, ANY, events(1, "b1")).await.unwrap();
    assert_eq!((r.first_version, r.first_position), (2, 2));
    // A's guess (version 1) is stale. An append expecting 1, as A believes,
    // is a real conflict; expecting 2 succeeds; Any lands after 2.
    match a.append(&order, exact(1), events(1, "a")).await {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, 2),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let r = a.append(&order, exact(2), events(2, "a2")).await.unwrap();
    assert_eq!((r.first_version, r.last_version), (3, 4));
    // Now B's guess (2) is stale, and Any must not overwrite version 3.
    let r = b.append(&order, ANY, events(1, "b2")).await.unwrap();
    assert_eq!((r.first_version, r.first_position), (5, 5));
    // Same for a stream created elsewhere while A guessed nothing.
    let other = sid("Order-2");
    b.append(&other, ANY, events(3, "b")).await.unwrap();
    let r = a.append(&other, ANY, events(1, "a")).await.unwrap();
    assert_eq!(r.first_version, 4);

    let stored = a
        .read_stream(&order, factline_core::ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(
        stored.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    let all = a.read_all(1, 100).await.unwrap();
    assert!(all.iter().zip(1..).all(|(e, p)| e.position == p));
    // Both paths ran: guesses that held committed in one round trip.
    assert!(a.stats().fast_transactions >= 1 && b.stats().fast_transactions >= 1);
    assert!(a.stats().fast_transactions < a.stats().transactions);
}

/// Reads share a bounded pool: many concurrent reads open no more than
/// `pool_size` connections, and all of them complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reads_share_a_bounded_pool() {
    let db = factline_testkit::pg::database().await;
    let mut config = PostgresConfig::new(&db.url);
    config.pool_size = 3;
    let store = PostgresStore::connect_with(config).await.unwrap();
    store
        .append(&sid("Order-1"), ANY, events(10, "r"))
        .await
        .unwrap();
    let reads: Vec<_> = (0..200)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.read_all(1, 100).await })
        })
        .collect();
    for read in reads {
        assert_eq!(read.await.unwrap().unwrap().len(), 10);
    }
    let admin = factline_testkit::pg::connect(&db.url).await;
    let pooled: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'factline'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!((1..=3).contains(&pooled), "{pooled} pooled connections");
}
