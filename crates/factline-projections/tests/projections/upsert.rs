//! P2: upserts into read models outside the projection's transaction win
//! only with a newer position, so replays and reordering never overwrite
//! newer state. On SQLite and PostgreSQL.

use std::collections::BTreeMap;

use factline_projections::{postgres, sqlite};

/// (order, status, position): every order's changes, then the same
/// deliveries again (a replay).
fn deliveries() -> Vec<(String, String, u64)> {
    let mut all = Vec::new();
    for position in 1..=60u64 {
        let order = format!("o{}", position % 7);
        all.push((order, format!("status@{position}"), position));
    }
    let replay = all.clone();
    all.extend(replay);
    all
}

/// The newest status of each order.
fn newest() -> BTreeMap<String, (String, i64)> {
    let mut state = BTreeMap::new();
    for (order, status, position) in deliveries() {
        state.insert(order, (status, position as i64));
    }
    state
}

fn shuffled(seed: u64) -> Vec<(String, String, u64)> {
    let mut all = deliveries();
    fastrand::Rng::with_seed(seed).shuffle(&mut all);
    all
}

#[test]
fn sqlite_upserts_keep_the_newest_state_whatever_the_order() {
    for seed in 0..5 {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute(
            "CREATE TABLE order_status (order_id TEXT PRIMARY KEY, status TEXT NOT NULL, last_position INTEGER NOT NULL)",
            [],
        )
        .unwrap();
        let mut wins = 0;
        for (order, status, position) in shuffled(seed) {
            let won = sqlite::upsert_if_newer(
                &conn,
                "order_status",
                &[("order_id", &order)],
                &[("status", &status)],
                position,
            )
            .unwrap();
            wins += usize::from(won);
        }
        assert!(wins < deliveries().len(), "replays and stale writes lose");
        let mut stmt = conn
            .prepare("SELECT order_id, status, last_position FROM order_status")
            .unwrap();
        let state: BTreeMap<String, (String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(state, newest(), "seed {seed}");
    }
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    let hostile = sqlite::upsert_if_newer(&conn, "t; DROP TABLE x", &[("k", &1)], &[], 1);
    assert!(hostile.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upserts_keep_the_newest_state_whatever_the_order() {
    let db = factline_testkit::pg::database().await;
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    for seed in 0..5 {
        client
            .batch_execute(
                "DROP SCHEMA IF EXISTS read CASCADE; CREATE SCHEMA read;
                 CREATE TABLE read.order_status (order_id text PRIMARY KEY, status text NOT NULL, last_position bigint NOT NULL)",
            )
            .await
            .unwrap();
        for (order, status, position) in shuffled(seed) {
            postgres::upsert_if_newer(
                &client,
                "read.order_status",
                &[("order_id", &order)],
                &[("status", &status)],
                position,
            )
            .await
            .unwrap();
        }
        let rows = client
            .query(
                "SELECT order_id, status, last_position FROM read.order_status",
                &[],
            )
            .await
            .unwrap();
        let state: BTreeMap<String, (String, i64)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        assert_eq!(state, newest(), "seed {seed}");
    }
    let bad =
        postgres::upsert_if_newer(&client, "read.t", &[("last_position", &1i64)], &[], 1).await;
    assert!(bad.is_err());
}
